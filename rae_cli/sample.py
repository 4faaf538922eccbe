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

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rae_cli import faults
from rae_cli.config import ConfigError
from rae_cli.sample_config import (  # noqa: F401  (re-exported: the names of this module before the split)
    _FREE_KEYS, GUIDANCE_METHODS, IMAGES_DIR, INFO_NAME, LABEL_PLAN_STREAM, LABEL_SAMPLING, LATENTS_NAME, METHODS,
    NPZ_NAME, RANDOM_LABEL_STREAM, SDE_NOISE_STREAM, GuidanceConfig, SampleConfig, resolve_sample_config)
from rae_cli.sample_outputs import _needs_v2, _pack_latents, write_grid, write_npz_from_pngs  # noqa: F401
from rae_cli.sample_resume import (  # noqa: F401
    _SOURCES, _check_resumable, _latent_complete, latent_path, pin_sources, png_path, source_identity)
from rae_cli.schema import FlowConfig

log = logging.getLogger(__name__)


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
        rae = build_rae(cfg.rae, device=device, parts={"decoder"}).eval()  # decodes only: no encoder
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
