"""``rae sample``: class-conditional images from a stage-2 model and the RAE decoder (paper §5; spec §4, §5, §7).

One seed per image: the noise of image i comes from ``distributed.generator(seed, i)`` (drawn on the CPU, then
moved), its label from the (seed, N) label plan, so the same images come out for any batch size, device count or
resume. Under torchrun rank r makes the images i ≡ r (mod world). Outputs in ``OUT/``:

    images/{i:06d}.png   one PNG per image (uint8, lossless): what resume looks at
    samples.npz          ADM evaluation-suite batch: ``arr_0`` uint8 (N, H, W, 3), built from the PNGs in index
                         order; pixels = uint8(clamp(x, 0, 1)·255), truncated like the official sampler
    grid.png             the first ``grid_images`` images
    sample_info.json     labels, network evaluations per image, time grid, throughput
    config.yaml          the resolved config (a later run in the same folder must produce the same images), and
                         under ``resolved_sources`` the checkpoint file/folder each model came from with its SHA-256:
                         a resumed run uses exactly those (``checkpoint=RUN`` is not re-resolved to a newer step)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List, Optional

import torch

from rae_cli import faults
from rae_cli.config import ConfigError, doc
from rae_cli.errors import RaeError
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig

log = logging.getLogger(__name__)

METHODS = ("euler", "heun", "sde", "meanflow")
GUIDANCE_METHODS = ("none", "cfg", "autoguidance")
LABEL_SAMPLING = ("balanced", "random")
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
LATENTS_NAME = "latents.safetensors"
INFO_NAME = "sample_info.json"
# Seed streams next to the per-image noise stream generator(seed, i): documented here, nowhere else.
LABEL_PLAN_STREAM = -1  # balanced labels: one permutation of the N slots, from generator(seed, -1, N)
RANDOM_LABEL_STREAM = 1  # random labels: image i's label from generator(seed, i, 1)
SDE_NOISE_STREAM = 2  # Euler–Maruyama noise of image i from generator(seed, i, 2)


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class GuidanceConfig:
    """Guidance (spec §5): classifier-free guidance or AutoGuidance with a weaker guide model, inside [t_min, t_max]."""

    method: str = doc("none, cfg (classifier-free, needs a model trained with label dropout) or autoguidance "
                      "(a smaller / less-trained guide model with the same labels).", "none")
    scale: float = doc("Guidance scale s: v = v_weak + s·(v − v_weak); 1 = no guidance (no extra network pass).", 1.0)
    t_min: float = doc("Guide only where t_min ≤ t ≤ t_max (t = 1 is noise).", 0.0)
    t_max: float = doc("Upper end of the guidance interval.", 1.0)
    guide_checkpoint: Optional[str] = doc("AutoGuidance model: one of our checkpoint folders, an official "
                                          "stage2_model.pt, or a released artifact name (e.g. ditdh-s-guide-256).",
                                          None)
    guide_dit: Optional[DiTConfig] = doc("Architecture of an official guide .pt (a string names a dit preset); "
                                         "null for our checkpoint folders (their config.yaml says).", None)
    guide_weights: str = doc("Which weights of a guide training checkpoint: ema or model.", "ema")

    def validate(self) -> None:
        if self.method not in GUIDANCE_METHODS:
            raise ConfigError(f"guidance.method must be one of {', '.join(GUIDANCE_METHODS)}, not {self.method!r}")
        if self.scale < 0:
            raise ConfigError("guidance.scale must be ≥ 0")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ConfigError(f"guidance needs 0 ≤ t_min ≤ t_max ≤ 1, got [{self.t_min}, {self.t_max}]")
        if self.method == "autoguidance" and self.scale != 1.0 and not self.guide_checkpoint:
            raise ConfigError("guidance.method=autoguidance needs guidance.guide_checkpoint (the guide model)")
        if self.guide_weights not in ("ema", "model"):
            raise ConfigError(f"guidance.guide_weights must be ema or model, not {self.guide_weights!r}")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.scale != 1.0


@dataclass
class SampleConfig:
    """``rae sample``: stage-2 model + RAE decoder → images (PNGs, an ADM .npz, a grid)."""

    preset_kind: ClassVar[str] = "sample"

    checkpoint: Optional[str] = doc("The stage-2 model: one of our checkpoint folders (a step-* folder, or a "
                                    "train-dit run folder → its latest checkpoint), an official stage2_model.pt "
                                    "(raw, {'ema': ...} or a training checkpoint), or a released artifact name.",
                                    None)
    weights: str = doc("Which weights of a checkpoint that holds both: ema (paper) or model.", "ema")
    dit: Optional[DiTConfig] = doc("Stage-2 architecture (a string names a dit preset); null = from the "
                                   "checkpoint folder's config.yaml. Needed for official .pt files.", None)
    rae: Optional[RAEConfig] = doc("The autoencoder whose decoder turns latents into images (a string names an rae "
                                   "preset); null = the checkpoint folder's. rae.decoder_patch_size sets the image "
                                   "size (2× patch: 256-latents → 512² images).", None)
    flow: Optional[FlowConfig] = doc("Flow settings; only the time shift matters here (null shift = "
                                     "sqrt(prod(latent_shape)/shift_base)). null = the checkpoint folder's.", None)
    latent_shape: Optional[List[int]] = doc("Latent (C, h, w); null = the checkpoint's, else read off the weights.",
                                            None)
    num_classes: Optional[int] = doc("Number of classes of the model; null = the checkpoint's, else read off the "
                                     "weights.", None)
    guidance: GuidanceConfig = doc("Guidance.", factory=GuidanceConfig)
    method: str = doc("Sampler: euler, heun (2 network evaluations per step), sde (Euler–Maruyama) or meanflow "
                      "(average-velocity jumps of a MeanFlow model: train-dit objective=meanflow).", "euler")
    num_steps: int = doc("Time-grid POINTS (official semantics): 50 → 49 steps; NFE is reported per image. "
                         "method=meanflow: the number of jumps = network evaluations (1 = one-step).", 50)
    to_zero: bool = doc("Integrate all the way to t = 0 instead of stopping at shift(0.001) (official).", False)
    sde_diffusion: float = doc("Euler–Maruyama diffusion w(t) = sde_diffusion·t (method=sde).", 1.0)
    num_images: int = doc("How many images (the paper's FID protocol: 50000).", 16)
    labels: Optional[List[int]] = doc("Explicit class labels; image i gets labels[i mod len(labels)].", None)
    label_sampling: str = doc("Without explicit labels: balanced (equal count per class, randomly ordered; the FID "
                              "protocol) or random (uniform per image).", "balanced")
    seed: int = doc("Global seed: image i's noise comes from (seed, i).", 0)
    batch_size: int = doc("Images per forward pass, per process (does not change the images).", 16)
    dtype: str = doc("fp32, or bf16 (autocast for the networks; the sampler state stays fp32).", "fp32")
    tf32: bool = doc("Allow TF32 matmuls on NVIDIA GPUs (the official sampler's default; no effect on CPU).", True)
    device: str = doc("auto, cpu or cuda (torchrun: one GPU per process).", "auto")
    dist_timeout: Optional[float] = doc("Under torchrun: minutes a collective waits for the other processes before "
                                        "the job fails (null = torch's default: NCCL 10, gloo 30).", None)
    decode: bool = doc("Decode to images; false = save the sampled (normalised) latents only.", True)
    grid_images: int = doc("How many images go into grid.png (0 = no grid).", 64)
    npz: bool = doc("Write samples.npz (ADM evaluation format) when all images exist.", True)
    dit_random_init: bool = doc("TEST ONLY: a randomly initialised stage-2 model (no checkpoint).", False)
    allow_stats_mismatch: bool = doc("Decode with rae.stats even if they differ (by content hash) from the latent "
                                     "statistics the checkpoint was trained with (by default that is an error; "
                                     "without rae.stats a train-dit checkpoint uses its own copy).", False)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.method == "meanflow":
            if self.num_steps < 1:
                raise ConfigError("method=meanflow: num_steps counts jumps and must be ≥ 1")
            if self.guidance.active:
                raise ConfigError("method=meanflow: guidance is folded into MeanFlow training "
                                  "(meanflow.guidance_scale); sample with guidance.method=none")
        elif self.num_steps < 2:
            raise ConfigError("num_steps counts grid points and must be ≥ 2 (one step)")
        if self.num_images < 1 or self.batch_size < 1 or self.grid_images < 0:
            raise ConfigError("num_images and batch_size must be ≥ 1, grid_images ≥ 0")
        if self.label_sampling not in LABEL_SAMPLING:
            raise ConfigError(f"label_sampling must be one of {', '.join(LABEL_SAMPLING)}, "
                              f"not {self.label_sampling!r}")
        if self.labels is not None and (len(self.labels) == 0 or min(self.labels) < 0):
            raise ConfigError("labels must be a non-empty list of class indices ≥ 0")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, not {self.dtype!r}")
        if self.weights not in ("ema", "model"):
            raise ConfigError(f"weights must be ema or model, not {self.weights!r}")
        if self.sde_diffusion < 0:
            raise ConfigError("sde_diffusion must be ≥ 0")
        if self.latent_shape is not None and len(self.latent_shape) != 3:
            raise ConfigError(f"latent_shape must be [C, h, w], got {self.latent_shape}")


# Keys that do not change which images come out: a resumed run may change them.
_FREE_KEYS = {"batch_size", "device", "dist_timeout", "grid_images", "npz", "rae_version"}


def resolve_sample_config(preset: str | None, overrides: list[str] = ()) -> tuple[dict, SampleConfig]:
    """Resolve in two passes: the first finds the checkpoint; if it is one of our folders, the second puts that
    folder's settings (rae, dit, flow, latent_shape, num_classes) above the preset and below the overrides.

    So ``-p tiny checkpoint=RUN`` samples RUN's architecture with RUN's autoencoder, while an explicit override
    (``rae.decoder_patch_size=16``) still wins. Returns (the checkpoint's settings, the config).
    """
    from rae_cli.config import resolve
    from rae_cli.stage2_loading import checkpoint_base

    overrides = list(overrides)
    first = resolve(SampleConfig, preset=preset, overrides=overrides)
    base = checkpoint_base(first.checkpoint) if first.checkpoint else {}
    if not base:
        return base, first
    # Each section as one flow-style YAML override (JSON is YAML), placed before the user's overrides.
    from_checkpoint = [f"{key}={json.dumps(value)}" for key, value in base.items()]
    return base, resolve(SampleConfig, preset=preset, overrides=from_checkpoint + overrides)


# ---------------------------------------------------------------------------------------------------- labels


def class_labels(num_images: int, num_classes: int, seed: int, mode: str = "balanced",
                 explicit: list[int] | None = None) -> torch.Tensor:
    """Labels (N,) int64 of images 0..N−1; none depends on batch size or process count.

    explicit: labels[i mod len]; balanced: slot i gets class perm[i] mod K for one seeded permutation of the N
    slots, so every class appears ⌊N/K⌋ or ⌈N/K⌉ times (exactly N/K when K divides N, as the paper's 50 per class);
    random: image i's label is uniform from generator(seed, i, 1).
    """
    from rae_cli.distributed import generator

    if explicit:
        bad = [c for c in explicit if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"labels {bad} are outside [0, {num_classes - 1}] for this {num_classes}-class model")
        reps = math.ceil(num_images / len(explicit))
        return torch.tensor(list(explicit) * reps, dtype=torch.long)[:num_images]
    if mode == "balanced":
        perm = torch.randperm(num_images, generator=generator(seed, LABEL_PLAN_STREAM, num_images))
        return perm % num_classes
    if mode == "random":
        return torch.stack([torch.randint(num_classes, (), generator=generator(seed, i, RANDOM_LABEL_STREAM))
                            for i in range(num_images)])
    raise ConfigError(f"unknown label_sampling {mode!r}")


def image_noise(indices: list[int], latent_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise (B, C, h, w) fp32: image i's from generator(seed, i) on the CPU (same on every device)."""
    from rae_cli.distributed import generator

    return torch.stack([torch.randn(latent_shape, generator=generator(seed, i)) for i in indices])


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass
class Sampling:
    """Everything needed to turn (indices, labels) into latents: networks, guidance, grid."""

    model: Any  # CountingModel around the stage-2 network
    guide: Any | None  # CountingModel around the guide network (AutoGuidance)
    latent_shape: tuple[int, int, int]
    num_classes: int
    shift: float
    cfg: SampleConfig
    device: torch.device

    def latents(self, indices: list[int], labels: torch.Tensor) -> torch.Tensor:
        """Sample normalised latents (B, C, h, w) fp32 for images ``indices`` with class ``labels`` (B,)."""
        z = image_noise(indices, self.latent_shape, self.cfg.seed)
        return self.integrate(z, labels, indices)

    def integrate(self, z: torch.Tensor, labels: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
        """Integrate the (guided) flow from noise ``z`` (B, C, h, w) at t = 1 to the end of the time grid.

        ``indices`` seed the per-image noise of the SDE sampler (generator(seed, i, 2), drawn on the sampling
        device, so SDE images differ between CPU and GPU); ODE samplers ignore it.
        """
        from rae_cli import samplers
        from rae_cli.distributed import generator
        from rae_cli.guidance import guided_model_fn

        g = self.cfg.guidance
        method = g.method if g.active else "none"
        z, y = z.to(self.device, torch.float32), labels.to(self.device)

        def model_fn(rows: slice):
            return guided_model_fn(self.model, y[rows], method, g.scale, g.t_min, g.t_max, guide_model=self.guide,
                                   null_label=self.num_classes)

        if self.cfg.method == "meanflow":
            from rae_cli import meanflow

            return meanflow.sample(lambda x, r, t: self.model(x, t, y, r=r), z, num_steps=self.cfg.num_steps,
                                   shift=self.shift).samples
        kwargs = dict(num_steps=self.cfg.num_steps, shift=self.shift, to_zero=self.cfg.to_zero)
        if self.cfg.method != "sde":
            return samplers.sample(self.cfg.method, model_fn(slice(None)), z, **kwargs).samples
        # Euler–Maruyama draws fresh noise every step; to keep image i independent of its batch-mates, row i draws
        # from its own generator (seed, i, 2), and the whole batch goes through the network at once.
        if indices is None:
            raise ValueError("the sde sampler needs the image indices (they seed its per-image noise)")
        gens = [generator(self.cfg.seed, i, SDE_NOISE_STREAM, device=self.device) for i in indices]
        return samplers.sample("sde", model_fn(slice(None)), z, generator=gens, diffusion_scale=self.cfg.sde_diffusion,
                               **kwargs).samples


def _network(module: torch.nn.Module, bf16: bool, device: torch.device):
    """``net(x, t, y)`` under bf16 autocast when asked, returning fp32 velocities (the sampler state stays fp32)."""
    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return module(x, t, y, **kwargs).float()
    return net


@dataclass
class SampleSummary:
    out_dir: Path
    num_images: int
    generated: int  # made by this run (the rest existed already)
    seconds: float
    images_per_second: float | None
    nfe_per_image: dict = field(default_factory=dict)  # {"main": .., "guide": ..}: network evaluations per image
    npz: Path | None = None
    grid: Path | None = None


def png_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / IMAGES_DIR / f"{index:06d}.png"


def latent_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "latents" / f"{index:06d}.safetensors"


def _latent_complete(out_dir: Path, index: int) -> bool:
    from rae_cli.checkpoint import CheckpointError, check_safetensors_file

    try:
        check_safetensors_file(latent_path(out_dir, index))
    except CheckpointError:
        return False
    return True


def _check_resumable(cfg: SampleConfig, out_dir: Path) -> None:
    """A folder that already holds a config must have been made by the same image-defining settings."""
    from rae_cli.config import read_yaml, to_dict

    path = out_dir / "config.yaml"
    if not path.is_file():
        return
    new = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in _FREE_KEYS}
    old = {k: v for k, v in read_yaml(path).items() if k in new}
    if cfg.labels is not None or cfg.label_sampling == "random":
        old.pop("num_images", None)  # more images may be added: earlier labels do not depend on N
        new.pop("num_images", None)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"{out_dir} already holds samples made with different settings ({', '.join(diff)}); "
                          "use a new output folder, or delete it to start over")


_SOURCES = {"checkpoint": lambda c: c.checkpoint, "guidance.guide_checkpoint": lambda c: c.guidance.guide_checkpoint}


def source_identity(source: str) -> dict:
    """What a ``checkpoint`` setting points at now: ``{"path", "sha256"}`` of the resolved checkpoint folder (a run
    folder → its newest intact step; the hash covers its weight files) or weights file (official .pt, artifact)."""
    import hashlib

    from rae_cli.checkpoint import sha256_file
    from rae_cli.stage2_loading import WEIGHT_FILES, _official_path, checkpoint_dir

    folder = checkpoint_dir(source)
    if folder is None:
        path = _official_path(source)
        return {"path": str(path.resolve()), "sha256": sha256_file(path)}
    h = hashlib.sha256()
    for name in sorted(WEIGHT_FILES.values()):
        if (folder / name).is_file():
            h.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return {"path": str(folder.resolve()), "sha256": h.hexdigest()}


def pin_sources(cfg: SampleConfig, out_dir: Path) -> tuple[SampleConfig, dict]:
    """The config with each model source fixed to the file/folder the images in ``out_dir`` were made with.

    A first run records what ``checkpoint=`` (and the guide) resolve to, with a content hash; a resumed run reuses
    that record — if the run folder gained a newer checkpoint meanwhile, the earlier one is still used, so one
    output folder never mixes two models. If the recorded checkpoint is gone or changed, it is an error.
    Returns (config to sample with, the record to save in config.yaml).
    """
    import dataclasses

    from rae_cli.config import read_yaml

    old = {}
    if (out_dir / "config.yaml").is_file():
        old = read_yaml(out_dir / "config.yaml").get("resolved_sources") or {}
    record, pinned = {}, {}
    for key, get in _SOURCES.items():
        source = get(cfg)
        if not source:
            continue
        before = old.get(key)
        if before is None:
            record[key] = source_identity(source)
            continue
        try:
            now = source_identity(before["path"])
        except (RaeError, OSError):
            now = None
        if now is None or now["sha256"] != before["sha256"]:
            state = "is no longer there" if now is None else "has changed since (its content hash differs)"
            raise ConfigError(f"{out_dir} holds images made with {key}={before['path']}, which {state}; finishing "
                              "with another model would mix two models in one folder. Use a new output folder, or "
                              "delete this one to start over")
        latest = source_identity(source)["path"]
        if latest != before["path"]:
            log.warning("%s now resolves to %s, but the images already in %s were made with %s: continuing with "
                        "that one (use a new output folder to sample the newer checkpoint)", key, latest, out_dir,
                        before["path"])
        record[key] = before
        pinned[key] = before["path"]
    if "checkpoint" in pinned:
        cfg = dataclasses.replace(cfg, checkpoint=pinned["checkpoint"])
    if "guidance.guide_checkpoint" in pinned:
        cfg = dataclasses.replace(cfg, guidance=dataclasses.replace(
            cfg.guidance, guide_checkpoint=pinned["guidance.guide_checkpoint"]))
    return cfg, record


def prepare(cfg: SampleConfig, device: torch.device | str = "cpu") -> tuple[Sampling, Any, Any]:
    """Load the stage-2 model (and guide) and, if decoding, the RAE: (sampling, rae or None, stage-2 model)."""
    from rae_cli.build import build_rae
    from rae_cli.guidance import CountingModel
    from rae_cli.stage2_loading import load_guide, load_stage2

    device = torch.device(device)
    stage2 = load_stage2(cfg, device=device)
    if cfg.method == "meanflow" and getattr(stage2.model, "second_time", "none") == "none":
        raise ConfigError("method=meanflow needs a MeanFlow model (train-dit objective=meanflow); this one is a "
                          "flow-matching model: sample it with euler or heun")
    guide = load_guide(cfg, stage2, device=device) if cfg.guidance.active and \
        cfg.guidance.method == "autoguidance" else None
    rae = None
    if cfg.decode:
        if cfg.rae is None:
            raise ConfigError("decoding needs an autoencoder: set rae=<preset> (or decode=false for latents only)")
        if not cfg.rae.decoder_weights:
            log.warning("no decoder weights given (rae.decoder_weights): images come from a RANDOM decoder")
        from rae_cli.stage2_bundle import check_sampling_stats
        from rae_cli.stage2_loading import checkpoint_dir

        folder = checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
        check_sampling_stats(folder, cfg.rae.stats, cfg.allow_stats_mismatch)
        rae = build_rae(cfg.rae, device=device).eval()
        if tuple(rae.latent_shape) != tuple(stage2.latent_shape):
            raise ConfigError(f"the stage-2 model makes latents of shape {tuple(stage2.latent_shape)} but the "
                              f"autoencoder (rae: {cfg.rae.encoder}, input {cfg.rae.encoder_input_size}) decodes "
                              f"{tuple(rae.latent_shape)}; use the rae preset the model was trained on")
    flow = cfg.flow or FlowConfig()
    bf16 = cfg.dtype == "bf16"
    sampling = Sampling(
        model=CountingModel(_network(stage2.model, bf16, device)),
        guide=CountingModel(_network(guide.model, bf16, device)) if guide is not None else None,
        latent_shape=tuple(stage2.latent_shape), num_classes=stage2.num_classes,
        shift=flow.resolved_shift(stage2.latent_shape), cfg=cfg, device=device)
    return sampling, rae, stage2


def sample(cfg: SampleConfig, out_dir: str | Path) -> SampleSummary:
    """Generate ``cfg.num_images`` images into ``out_dir`` (see the module docstring); resumes a partial folder.

    Works unchanged under torchrun (images are split by index over the ranks).
    """
    from rae_cli import distributed
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.config import save_resolved
    from rae_cli.npz import png_complete

    dist = distributed.init(cfg.device, cfg.dist_timeout)
    device = dist.device
    distributed.set_tf32(device, cfg.tf32)
    out_dir = Path(out_dir)
    _check_resumable(cfg, out_dir)  # on every rank, so that all of them stop together
    model_cfg, sources = pin_sources(cfg, out_dir)  # before the barrier: rank 0 rewrites config.yaml after it
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(dist)

    sampling, rae, stage2 = prepare(model_cfg, device)
    shift = sampling.shift
    bf16 = cfg.dtype == "bf16"

    labels = class_labels(cfg.num_images, stage2.num_classes, cfg.seed, cfg.label_sampling, cfg.labels)
    done = (lambda i: png_complete(png_path(out_dir, i))) if cfg.decode else (lambda i: _latent_complete(out_dir, i))
    mine = [i for i in range(dist.rank, cfg.num_images, dist.world_size) if not done(i)]
    if dist.is_main:
        save_resolved(cfg, out_dir / "config.yaml", extra={"command": "sample", "shift": shift,
                                                            "source": stage2.source, "resolved_sources": sources})
        log.info("sampling %d images (%d to make on this process of %d) with %s, %d grid points, shift %.4f%s",
                 cfg.num_images, len(mine), dist.world_size, cfg.method, cfg.num_steps, shift,
                 f", {cfg.guidance.method} {cfg.guidance.scale}" if cfg.guidance.active else "")

    start = time.perf_counter()
    _generate(sampling, rae, mine, labels, out_dir, cfg, bf16, show_progress=dist.is_main)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    # Totals over processes: images made and network rows pushed through each model.
    counts = torch.tensor([len(mine), sampling.model.samples, sampling.guide.samples if sampling.guide else 0],
                          dtype=torch.float64, device=device)
    distributed.all_reduce_sum_(counts, dist)
    generated, main_rows, guide_rows = (int(c) for c in counts.tolist())
    distributed.barrier(dist)

    summary = SampleSummary(out_dir=out_dir, num_images=cfg.num_images, generated=generated, seconds=seconds,
                            images_per_second=generated / seconds if generated and seconds > 0 else None)
    if generated:
        summary.nfe_per_image = {"main": main_rows / generated, "guide": guide_rows / generated}
    missing = [i for i in range(cfg.num_images) if not done(i)]  # every rank looks (a shared folder is assumed)
    if missing:
        raise RuntimeError(f"{len(missing)} images are missing after sampling (first: {missing[:5]}); under torchrun "
                           f"the output folder must be shared by all processes")
    if dist.is_main:
        if cfg.decode:
            if cfg.npz:
                summary.npz = write_npz_from_pngs([png_path(out_dir, i) for i in range(cfg.num_images)],
                                                  out_dir / NPZ_NAME)
            if cfg.grid_images:
                summary.grid = write_grid([png_path(out_dir, i) for i in range(min(cfg.grid_images,
                                                                                     cfg.num_images))],
                                          out_dir / "grid.png")
        else:
            _pack_latents(out_dir, cfg.num_images)
        from rae_cli.meanflow import meanflow_grid
        from rae_cli.samplers import expected_nfe, time_grid

        info = {
            "num_images": cfg.num_images,
            "generated_this_run": generated,
            "labels": labels.tolist(),
            "method": cfg.method,
            "num_steps": cfg.num_steps,
            "sampler_steps": cfg.num_steps if cfg.method == "meanflow" else cfg.num_steps - 1,
            "time_grid": [round(float(t), 6) for t in (meanflow_grid(cfg.num_steps, shift) if cfg.method == "meanflow"
                                                       else time_grid(cfg.num_steps, shift, to_zero=cfg.to_zero))],
            "shift": shift,
            "guidance": {"method": cfg.guidance.method if cfg.guidance.active else "none",
                         "scale": cfg.guidance.scale, "t_min": cfg.guidance.t_min, "t_max": cfg.guidance.t_max},
            "nfe_per_image_unguided": expected_nfe(cfg.method, cfg.num_steps),
            "network_evaluations_per_image": summary.nfe_per_image or None,
            "seconds": seconds,
            "images_per_second": summary.images_per_second,
            "world_size": dist.world_size,
            "dtype": cfg.dtype,
            "source": stage2.source,
            "npz_pixels": "uint8(clamp(x, 0, 1) * 255), truncated (official sampler)",
        }
        atomic_write_json(out_dir / INFO_NAME, info)
    # No barrier here: the other ranks need nothing from rank 0's packing (minutes for 50k images), and a collective
    # waiting on it could time out (NCCL: 10 min) and fail the whole job. torchrun waits for every process anyway.
    return summary


def _generate(sampling: Sampling, rae, indices: list[int], labels: torch.Tensor, out_dir: Path, cfg: SampleConfig,
              bf16: bool, show_progress: bool) -> None:
    """Sample, decode and save the images ``indices`` in batches of ``cfg.batch_size``."""
    from rae_cli.checkpoint import save_safetensors
    from rae_cli.npz import save_image_folder, to_uint8

    progress = _progress(len(indices), show_progress)
    with progress as bar, torch.no_grad():
        for start in range(0, len(indices), cfg.batch_size):
            chunk = indices[start:start + cfg.batch_size]
            z = sampling.latents(chunk, labels[chunk])  # (B, C, h, w), normalised latent space
            if rae is None:
                for j, i in enumerate(chunk):
                    save_safetensors(latent_path(out_dir, i), {"latent": z[j]}, {"label": int(labels[i])})
                    faults.point("sample-image", i)
            else:
                with torch.autocast(sampling.device.type, dtype=torch.bfloat16, enabled=bf16):
                    images = rae.decode(z)  # de-normalises with the RAE's statistics; (B, 3, H, W)
                pixels = to_uint8(images.float().clamp(0, 1))  # (B, H, W, 3) uint8, truncated
                for j, i in enumerate(chunk):
                    # No fsync per image (50k × ~10 ms): resume checks each PNG's completeness (png_complete).
                    save_image_folder(pixels[j:j + 1], out_dir / IMAGES_DIR, start_index=i, durable=False)
                    faults.point("sample-image", i)
            bar.advance(len(chunk))


class _Bar:
    """A rich progress bar on rank 0; a no-op elsewhere."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self._progress = self._task = None

    def __enter__(self):
        if self.enabled and self.total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._progress.__enter__()
            self._task = self._progress.add_task("sample", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def _progress(total: int, enabled: bool) -> _Bar:
    return _Bar(total, enabled)


# ---------------------------------------------------------------------------------------------------- outputs


def write_npz_from_pngs(paths: list[Path], out: Path) -> Path:
    """Pack PNGs (in the given order) into an ADM-style ``.npz`` (``arr_0`` uint8 (N, H, W, 3)), streaming.

    The array is written image by image into the zip member, so memory stays at one image (50k images at 512²
    are 39 GB). Uncompressed, like ``np.savez``; written to a temporary name, then renamed.
    """
    import zipfile

    import numpy as np

    from rae_cli.checkpoint import atomic_path
    from rae_cli.data import open_rgb
    from rae_cli.errors import DataError
    from rae_cli.npz import IMAGES_KEY

    first = np.asarray(open_rgb(paths[0]), dtype=np.uint8)
    shape = (len(paths), *first.shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header) if _needs_v2(header) else \
                    np.lib.format.write_array_header_1_0(member, header)
                for p in paths:
                    image = np.asarray(open_rgb(p), dtype=np.uint8)
                    if image.shape != first.shape:
                        raise DataError(f"{p} is {image.shape} but {paths[0]} is {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
    return out


def _needs_v2(header: dict) -> bool:
    """npy format 1.0 limits the header to 65535 bytes; only absurd shapes need 2.0."""
    return len(repr(header)) > 65000


def write_grid(paths: list[Path], out: Path) -> Path:
    """A grid of the given PNGs, about square."""
    import numpy as np

    from rae_cli.data import make_grid, open_rgb, save_image

    images = torch.stack([torch.from_numpy(np.array(open_rgb(p), dtype=np.uint8)).permute(2, 0, 1)
                          for p in paths]).float() / 255.0  # (B, 3, H, W)
    save_image(make_grid(images, nrow=max(1, math.ceil(math.sqrt(len(paths))))), out)
    return out


def _pack_latents(out_dir: Path, num_images: int) -> Path:
    """All per-image latents (decode=false) in one safetensors file: ``latents`` (N, C, h, w) fp32 and ``labels``
    (N,) int64, streamed image by image (memory stays at one latent: 50k latents at 512² are 157 GB)."""
    import struct

    from rae_cli.checkpoint import atomic_path, load_safetensors
    from rae_cli.errors import DataError

    first, _ = load_safetensors(latent_path(out_dir, 0))
    shape = tuple(first["latent"].shape)
    per = first["latent"].numel() * 4
    meta = {"normalized": "true", "note": "sampled latents in the normalised space (decode with the RAE)"}
    header = {"__metadata__": meta,
              "latents": {"dtype": "F32", "shape": [num_images, *shape], "data_offsets": [0, per * num_images]},
              "labels": {"dtype": "I64", "shape": [num_images],
                         "data_offsets": [per * num_images, per * num_images + 8 * num_images]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    labels = []
    out = out_dir / LATENTS_NAME
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i in range(num_images):
            tensors, info = load_safetensors(latent_path(out_dir, i))
            z = tensors["latent"].float().contiguous()
            if tuple(z.shape) != shape:
                raise DataError(f"{latent_path(out_dir, i)} holds a latent of shape {tuple(z.shape)}, not {shape}")
            f.write(z.numpy().tobytes())
            labels.append(int(info["label"]))
        f.write(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    return out
