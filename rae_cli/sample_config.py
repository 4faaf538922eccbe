"""The ``rae sample`` config: its settings (:class:`SampleConfig`, :class:`GuidanceConfig`), the file names and
seed streams of an output folder, and the two-pass resolution against a checkpoint folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from rae_cli.config import ConfigError, doc
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig

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
    cfg = resolve(SampleConfig, preset=preset, overrides=from_checkpoint + overrides)
    own = (base.get("rae") or {}).get("stats")
    if cfg.rae is not None and cfg.rae.stats is None and own:
        # Another autoencoder (rae=OTHER.yaml, e.g. a second decoder of the same encoder) that names no statistics
        # decodes with the ones the model was trained with; stats given explicitly are still checked by hash.
        cfg = dataclasses.replace(cfg, rae=dataclasses.replace(cfg.rae, stats=own))
    return base, cfg
