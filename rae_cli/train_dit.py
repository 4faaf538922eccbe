"""Stage-2 training: a DiT / DiT^DH learns the flow-matching velocity on RAE latents (paper §4; spec §4, §6).

``train_dit(cfg=..., out_dir=...)`` is one code path for 1 or N processes (torchrun; gloo on CPU, NCCL on GPU).
Latents come from a latent cache (``rae cache-latents``, memory-mapped) or are encoded on the fly by the frozen
encoder (outside DDP, under no_grad, fp32 as the official code). The step is the official one with its bugs fixed
(spec §10.1 #4, #5): gradient accumulation with ``no_sync``, one clip and one AdamW step per global batch, an EMA
that starts equal to the model, the LR set from a stateless schedule.

Reproducibility: every random draw is derived from counters with :func:`rae_cli.distributed.generator` — the data
order from (seed, epoch), the mirror coin / label dropout / time of every sample of the *global* batch from
(seed, step), its noise from (seed, step, position in the global batch). Nothing depends on global RNG state, on
the rank or on the number of processes: a resumed run continues bit-identically on CPU, and 1 or N processes
with the same global batch see the same samples. Resume = run the same command again (same ``out_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, List, Optional

import torch

from rae_cli.config import ConfigError, doc
from rae_cli.errors import DataError, RaeError
from rae_cli.meanflow import MeanFlowConfig
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig

log = logging.getLogger(__name__)

# Stream ids for derive_seed(seed, stream, ...): one per kind of randomness, so that streams never collide.
SEED_INIT, SEED_ORDER, SEED_STEP, SEED_NOISE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class OptimConfig:
    """AdamW and gradient clipping (official: lr 2e-4, betas (0.9, 0.95), wd 0, eps 1e-8, fused, clip 1.0)."""

    lr: float = doc("Base learning rate.", 2e-4)
    betas: List[float] = doc("AdamW (β1, β2).", factory=lambda: [0.9, 0.95])
    weight_decay: float = doc("AdamW decoupled weight decay.", 0.0)
    eps: float = doc("AdamW ε.", 1e-8)
    fused: bool = doc("Use the fused AdamW kernel where this torch build has it.", True)
    clip_grad: Optional[float] = doc("Clip the global gradient norm to this value; null = no clipping.", 1.0)

    def validate(self) -> None:
        if self.lr < 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim needs lr ≥ 0 and two betas in [0, 1)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("optim.clip_grad must be > 0 (or null for no clipping)")


@dataclass
class ScheduleConfig:
    """LR schedule in epochs (official ``linear``: constant 40 epochs, then linear decay to 2e-5 at epoch 800)."""

    kind: str = doc("constant, linear (official) or cosine.", "linear")
    warmup_epochs: float = doc("Warmup length: the LR is constant (or ramps from 0 with warmup_from_zero).", 40)
    warmup_from_zero: bool = doc("Ramp linearly from 0 during the warmup (official: false, i.e. no ramp).", False)
    decay_end_epoch: float = doc("linear: epoch at which the LR reaches final_lr (cosine ends at the last epoch).",
                                 800)
    final_lr: float = doc("LR at the end of the decay.", 2e-5)

    def validate(self) -> None:
        from rae_cli.lr_schedule import SCHEDULES

        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule.kind must be one of {', '.join(SCHEDULES)}, not {self.kind!r}")
        if self.warmup_epochs < 0 or self.decay_end_epoch < 0 or self.final_lr < 0:
            raise ConfigError("schedule epochs and final_lr must be ≥ 0")


@dataclass
class TrainDiTConfig:
    """``rae train-dit``: a diffusion transformer trained on RAE latents (cache or on the fly)."""

    preset_kind: ClassVar[str] = "train-dit"

    rae: RAEConfig = doc("The autoencoder (a string names an rae preset). Its encoder makes the latents (on the fly "
                         "or, for a cache, must match the cache's); its decoder and stats are what `rae sample` "
                         "uses with the trained model.", factory=RAEConfig)
    dit: DiTConfig = doc("The diffusion transformer (a string names a dit preset).", factory=DiTConfig)
    flow: FlowConfig = doc("Flow matching: time distribution and shift.", factory=FlowConfig)
    objective: str = doc("flow (flow matching, the paper) or meanflow (average velocities for 1–2-step sampling; "
                         "needs dit.second_time; settings in meanflow).", "flow")
    meanflow: MeanFlowConfig = doc("MeanFlow training (objective: meanflow).", factory=MeanFlowConfig)
    teacher: Optional[str] = doc("objective meanflow: a frozen flow-matching train-dit run (or checkpoint folder) "
                                 "whose (guided) velocity replaces ε − x in the target (distillation, MF-RAE MFD); "
                                 "null = MeanFlow from the data alone.", None)
    optim: OptimConfig = doc("AdamW and clipping.", factory=OptimConfig)
    schedule: ScheduleConfig = doc("Learning-rate schedule.", factory=ScheduleConfig)

    cache: Optional[str] = doc("Latent cache folder from `rae cache-latents` (set by --cache).", None)
    images: Optional[str] = doc("Image folder encoded on the fly (set by --data); class sub-folders = labels.", None)
    stats: str = doc("Latent statistics used to normalise: auto (the cache's own stats.safetensors, else rae.stats), "
                     "a file path / released name, or none (train on raw latents).", "auto")
    num_classes: Optional[int] = doc("Number of classes; null = from the data (a flat folder = 1, unconditional). "
                                     "Filled in the saved config.", None)
    latent_shape: Optional[List[int]] = doc("[C, h, w] of the latents; null = from the data. Filled in the saved "
                                            "config.", None)
    image_size: Optional[int] = doc("On-the-fly only: ADM center-crop size; null = the autoencoder's image size.",
                                    None)
    hflip: bool = doc("Random horizontal flip (on the fly: of the image; cache: pick the cached mirror).", True)

    epochs: int = doc("Training length in epochs (official: 1400; the 80-epoch run is a shorter variant).", 1400)
    max_steps: Optional[int] = doc("Stop after this many optimizer steps in all (the schedule still follows "
                                   "epochs); null = train all epochs.", None)
    global_batch_size: int = doc("Images per optimizer step over all processes (official: 1024).", 1024)
    grad_accum_steps: int = doc("Micro-batches per optimizer step and process.", 1)
    ema_decay: float = doc("EMA decay per step (official: 0.9995).", 0.9995)
    seed: int = doc("Global seed: model init and every random draw derive from it (official: 42).", 42)
    precision: str = doc("fp32 (official recommendation) or bf16 (autocast).", "fp32")
    tf32: bool = doc("Allow TF32 matmuls on NVIDIA GPUs (official: on).", True)
    compile: bool = doc("torch.compile the model.", False)
    num_workers: int = doc("Data-loading worker processes per process (0 = in the main process).", 4)
    device: str = doc("auto, cpu or cuda (under torchrun: the local GPU).", "auto")

    log_every: int = doc("Steps between metric lines (metrics.jsonl, console, TensorBoard/W&B).", 100)
    ckpt_every_epochs: float = doc("Epochs between checkpoints (official: 10).", 10)
    ckpt_every_steps: Optional[int] = doc("Steps between checkpoints; overrides ckpt_every_epochs when set.", None)
    keep_last: int = doc("Retention: keep this many newest checkpoints.", 2)
    keep_every_epochs: Optional[float] = doc("Retention: also keep checkpoints at multiples of this many epochs "
                                             "(null = none).", 100)
    tensorboard: bool = doc("Also log to TensorBoard (OUT/tensorboard; needs the tensorboard package).", False)
    wandb: bool = doc("Also log to Weights & Biases (needs the wandb package and a login).", False)
    wandb_project: str = doc("W&B project name.", "rae")

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.global_batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1:
            raise ConfigError("global_batch_size, grad_accum_steps and epochs must be ≥ 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("ema_decay must be in [0, 1]")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError("max_steps must be ≥ 0")
        if self.log_every < 1 or self.keep_last < 1:
            raise ConfigError("log_every and keep_last must be ≥ 1")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ConfigError("ckpt_every_steps must be ≥ 1")
        if self.cache and self.images:
            raise ConfigError("give either a latent cache (--cache / cache=) or an image folder (--data / images=), "
                              "not both")
        if self.latent_shape is not None and len(self.latent_shape) != 3:
            raise ConfigError("latent_shape must be [C, h, w]")
        if self.objective not in ("flow", "meanflow"):
            raise ConfigError(f"objective must be flow or meanflow, not {self.objective!r}")
        if self.objective == "meanflow" and getattr(self.dit, "second_time", "none") == "none":
            raise ConfigError("objective=meanflow needs a model with a second time input: dit.second_time=interval")


class NonFiniteError(RaeError, FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; nothing after the last good checkpoint was saved."""


# ----------------------------------------------------------------------------------------------------------------
# Data: one item per optimizer step


def epoch_order(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The image order of ``epoch``: a permutation drawn from (seed, epoch) alone."""
    from rae_cli.distributed import generator

    return torch.randperm(num_images, generator=generator(seed, SEED_ORDER, epoch))


@dataclass(frozen=True)
class StepDraws:
    """Per-sample random choices of one global batch (G,), drawn on the CPU from (seed, step)."""

    u_mirror: torch.Tensor  # uniform: < 0.5 → use the horizontal mirror
    u_drop: torch.Tensor  # uniform: < label-dropout probability → null label
    t: torch.Tensor  # flow times, already shifted


def step_draws(cfg: TrainDiTConfig, step: int, shift: float) -> StepDraws:
    from rae_cli.distributed import generator
    from rae_cli.flow import sample_time

    g = generator(cfg.seed, SEED_STEP, step)
    n = cfg.global_batch_size
    u_mirror = torch.rand(n, generator=g)
    u_drop = torch.rand(n, generator=g)
    t = sample_time(n, cfg.flow.time_dist, mu=cfg.flow.logit_mu, sigma=cfg.flow.logit_sigma, t0=cfg.flow.t0,
                    t1=cfg.flow.t1, shift=shift, generator=g)
    return StepDraws(u_mirror, u_drop, t)


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = this process's share of the global batch of that step: (x, labels, positions).

    x is raw latents (B, C, h, w) from a cache, or images (B, 3, S, S) in [0, 1]; ``positions`` are the samples'
    indices in the global batch (rank r holds [r·B, (r+1)·B)). Pure function of the step, so any worker can
    produce any step and a resumed run gets exactly the batches it would have had.
    """

    def __init__(self, cfg: TrainDiTConfig, source: CacheSource | ImageSource, num_images: int,
                 steps_per_epoch: int, rank: int, world_size: int, shift: float):
        self.cfg, self.source, self.num_images = cfg, source, num_images
        self.steps_per_epoch, self.rank, self.world_size, self.shift = steps_per_epoch, rank, world_size, shift
        self.per_rank = cfg.global_batch_size // world_size
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # steps are addressed directly; the sampler decides which ones
        return 2**62

    def images_of_step(self, step: int) -> torch.Tensor:
        """The global batch of ``step`` as image indices (G,) (drop_last: an epoch is steps_per_epoch batches)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.num_images))
        g = self.cfg.global_batch_size
        return self._order[1][i * g:(i + 1) * g]

    def __getitem__(self, step: int):
        lo = self.rank * self.per_rank
        pos = torch.arange(lo, lo + self.per_rank)
        images = self.images_of_step(step)[pos]
        draws = step_draws(self.cfg, step, self.shift)
        mirror = (draws.u_mirror[pos] < 0.5) if self.cfg.hflip else torch.zeros(len(pos), dtype=torch.bool)
        x, y = self.source.fetch(images, mirror)
        return x, y, pos


class CacheSource:
    """Raw latents from a :class:`~rae_cli.latent_cache.LatentCache`; a mirror is the cached mirror's latent."""

    def __init__(self, cache):
        self.cache = cache

    def fetch(self, images: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read(self.cache.rows(images, mirror))  # (B, C, h, w) float32, (B,)


class ImageSource:
    """Images decoded on demand (ADM center crop, then the flip); an unreadable file is an error naming it."""

    def __init__(self, files, labels, image_size: int):
        self.files, self.labels, self.image_size = files, labels, image_size

    def fetch(self, images: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from rae_cli.data import load_image

        idx = images.tolist()
        x = torch.stack([load_image(self.files[i], self.image_size, crop="adm") for i in idx])  # (B, 3, S, S)
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)  # RandomHorizontalFlip after the crop
        return x, torch.tensor([self.labels[i] for i in idx], dtype=torch.int64)


def _collate_step(item):
    return item


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer, one optimizer step


def build_model(cfg: TrainDiTConfig, latent_shape, num_classes: int) -> torch.nn.Module:
    """The DiT of ``cfg`` with its init drawn from (seed) alone (global RNG state is saved and restored)."""
    from rae_cli.build import build_dit_model
    from rae_cli.distributed import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, SEED_INIT))
        try:
            return build_dit_model(cfg.dit, latent_shape, num_classes)
        except ValueError as e:  # e.g. the width rule of Theorem 1
            raise ConfigError(str(e)) from e


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused when available; the frozen pos-embed and t_embedder.W are out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            log.info("fused AdamW unavailable on %s (%s); using the default implementation", device, e)
    return torch.optim.AdamW(params, **kwargs)


def normalize_latents(z: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """(z − mean)/√(var + eps) per element (spec §1.3); identity without statistics."""
    if mean is None:
        return z
    return (z - mean) / torch.sqrt(var + eps)


def noise_for(cfg: TrainDiTConfig, step: int, positions: torch.Tensor, latent_shape, device) -> torch.Tensor:
    """ε for the samples at ``positions`` of the global batch of ``step``: one generator per sample, so the noise
    of a sample does not depend on how the batch is split over processes or micro-batches."""
    from rae_cli.distributed import generator

    shape = tuple(int(d) for d in latent_shape)
    return torch.stack([torch.randn(shape, generator=generator(cfg.seed, SEED_NOISE, step, int(j), device=device),
                                    device=device) for j in positions])


def train_step(*, model_fn, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, micro_batches,
               lr: float, clip_grad: float | None, precision: str, no_sync=None, dist=None,
               step: int | None = None, objective=None) -> tuple[float, float]:
    """One optimizer step over this process's ``micro_batches`` [(z, y, t, noise, drop_ids or None[, r])].

    ``objective``: None = flow matching; else a :class:`rae_cli.meanflow.MeanFlowLoss`, called with the micro-batch
    and its r, returning (loss to back-propagate, loss to log), both per sample.

    Each micro-batch loss is its per-sample mean divided by the number of micro-batches, so the accumulated
    gradient is that of the batch mean (DDP averages it over processes). Gradients are all-reduced on the last
    micro-batch only (``no_sync`` on the others), clipped once, and AdamW steps once; then the EMA follows.
    Before stepping, a NaN/Inf loss or gradient norm raises :class:`NonFiniteError` (same decision on every
    rank: the loss is all-reduced and the norm is of all-reduced gradients). Returns (mean loss, grad norm).
    """
    from rae_cli import faults
    from rae_cli.distributed import all_reduce_mean
    from rae_cli.flow import training_loss

    accum = len(micro_batches)
    autocast = torch.autocast(micro_batches[0][0].device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (z, y, t, noise, drop, *rest) in enumerate(micro_batches):
        # Forward and backward of all but the last micro-batch run without the DDP gradient all-reduce.
        sync = no_sync is None or i == accum - 1
        with contextlib.nullcontext() if sync else no_sync():
            with autocast:
                if objective is None:
                    kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
                    loss = logged = training_loss(model_fn, z, kwargs, t=t, noise=noise).mean() / accum  # fp32
                else:
                    weighted, mse = objective(model_fn, raw_model, z, y, drop, rest[0], t, noise)
                    loss, logged = weighted.mean() / accum, mse.mean() / accum
            loss.backward()
        loss_sum += logged.detach()
    if faults.nonfinite("loss", step):
        loss_sum = loss_sum * float("nan")
    params = [p for p in raw_model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad is not None else float("inf"))
    values = torch.stack([loss_sum, grad_norm.to(loss_sum)])
    if dist is not None:
        values = all_reduce_mean(values, dist)
    loss_value, norm_value = values.tolist()  # the one host sync per step
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the loss is {loss_value} and the gradient norm {norm_value}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(raw_model)
    return loss_value, norm_value


# ----------------------------------------------------------------------------------------------------------------
# Sources, resolved config, logging


@dataclass
class _Data:
    source: Any
    num_images: int
    latent_shape: tuple[int, int, int]
    num_classes: int
    classes: list
    stats_path: Optional[str]
    encoder: Any = None  # the frozen RAE (stats-free) for on-the-fly encoding


_ENCODER_KEYS = ("encoder", "encoder_source", "encoder_random_init", "encoder_input_size", "encoder_options")


def _open_data(cfg: TrainDiTConfig, device: torch.device) -> _Data:
    """The latent cache or image folder of ``cfg``, with everything derived from it."""
    if cfg.cache:
        from rae_cli.latent_cache import LatentCache

        cache = LatentCache(cfg.cache)
        diff = [k for k in _ENCODER_KEYS if cache.rae.get(k) != getattr(cfg.rae, k)]
        if cache.rae.get("encoder_random_init") and cache.rae.get("seed") != cfg.rae.seed:
            diff.append("seed")
        if diff:
            detail = "; ".join(f"rae.{k}: cache {cache.rae.get(k)!r}, config {getattr(cfg.rae, k)!r}" for k in diff)
            raise ConfigError(f"the latent cache {cfg.cache} was made with a different encoder than this config's "
                              f"rae section ({detail}). Use the rae preset the cache was made with.")
        if cfg.hflip and cache.copies == 1:
            log.warning("hflip=true but the cache has no mirrored copies (cache-latents flip=false): no flips")
        stats = str(cache.stats_path) if cfg.stats == "auto" else cfg.stats
        return _Data(CacheSource(cache), cache.num_images, cache.latent_shape, max(1, cache.num_classes),
                     cache.classes, stats)
    if cfg.images:
        from rae_cli.build import build_rae, image_size_of
        from rae_cli.data import scan_image_folder

        data = scan_image_folder(cfg.images)
        rae = build_rae(dataclasses.replace(cfg.rae, stats=None), device=device, decoder_weights=False).eval()
        rae.requires_grad_(False)
        size = int(cfg.image_size or image_size_of(cfg.rae, rae.encoder.patch_size))
        stats = cfg.rae.stats if cfg.stats == "auto" else cfg.stats
        if stats is None:
            raise ConfigError("no latent statistics for on-the-fly training: set rae.stats (or stats=PATH), or "
                              "stats=none to train on raw latents (not what the paper does)")
        return _Data(ImageSource(data.files, data.labels, size), len(data.files), tuple(rae.latent_shape),
                     max(1, data.num_classes), list(data.classes), stats, rae)
    raise DataError("nothing to train on: give --cache DIR (from `rae cache-latents`) or --data DIR (images, "
                    "encoded on the fly)")


def _resolve_stats_path(stats: str | None) -> str | None:
    if stats is None or stats == "none":
        return None
    from rae_cli.build import resolve_weights_path

    return str(Path(resolve_weights_path(stats)).resolve())


def _resolved(cfg: TrainDiTConfig, data: _Data, stats_path: str | None, shift: float) -> TrainDiTConfig:
    """``cfg`` with the data-derived values written in: what the saved config.yaml holds for ``rae sample``."""
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the data has {data.num_classes} classes")
    if cfg.latent_shape is not None and tuple(cfg.latent_shape) != tuple(data.latent_shape):
        raise ConfigError(f"latent_shape={list(cfg.latent_shape)} but the data's latents are "
                          f"{list(data.latent_shape)}")
    return dataclasses.replace(
        cfg, num_classes=data.num_classes, latent_shape=[int(d) for d in data.latent_shape],
        rae=dataclasses.replace(cfg.rae, stats=stats_path), stats=stats_path or "none",
        flow=dataclasses.replace(cfg.flow, shift=float(shift)),
        cache=str(Path(cfg.cache).resolve()) if cfg.cache else None,
        images=str(Path(cfg.images).resolve()) if cfg.images else None)


def _sources_from_previous_run(cfg: TrainDiTConfig, out: Path) -> TrainDiTConfig:
    """Re-running in the same folder without --cache/--data reuses the data of the previous launch."""
    if cfg.cache or cfg.images or not (out / "config.yaml").is_file():
        return cfg
    from rae_cli.config import read_yaml

    prev = read_yaml(out / "config.yaml")
    return dataclasses.replace(cfg, cache=prev.get("cache"), images=prev.get("images"))


def _warn_changes(old: dict, new: dict, prefix: str = "") -> None:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_changes(a, b, f"{prefix}{k}.")
        elif a != b and k != "rae_version":
            log.warning("resuming with a changed setting %s%s: %r → %r", prefix, k, a, b)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train-dit"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class Plan:
    """Step counts derived from the data size and the epoch-based settings."""

    steps_per_epoch: int
    total_steps: int
    stop_step: int
    warmup_steps: int
    decay_end_steps: int
    ckpt_every: int
    keep_every: Optional[int]

    @classmethod
    def of(cls, cfg: TrainDiTConfig, num_images: int) -> Plan:
        spe = num_images // cfg.global_batch_size  # drop_last, like the official DistributedSampler loader
        if spe < 1:
            raise DataError(f"global_batch_size={cfg.global_batch_size} is larger than the data "
                            f"({num_images} images): lower it")
        total = cfg.epochs * spe
        stop = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        ckpt = cfg.ckpt_every_steps or max(1, round(cfg.ckpt_every_epochs * spe))
        keep = max(1, round(cfg.keep_every_epochs * spe)) if cfg.keep_every_epochs else None
        return cls(spe, total, stop, round(cfg.schedule.warmup_epochs * spe),
                   round(cfg.schedule.decay_end_epoch * spe), ckpt, keep)

    def lr(self, cfg: TrainDiTConfig, step: int) -> float:
        from rae_cli.lr_schedule import lr_at

        s = cfg.schedule
        return lr_at(step, kind=s.kind, base_lr=cfg.optim.lr, final_lr=s.final_lr, warmup=self.warmup_steps,
                     warmup_from_zero=s.warmup_from_zero, decay_end=self.decay_end_steps, total=self.total_steps)


def _micro_batches(cfg: TrainDiTConfig, step: int, shift: float, x: torch.Tensor, y: torch.Tensor,
                   pos: torch.Tensor, data: _Data, mean, var, micro: int, device: torch.device) -> list:
    """This process's share of step ``step`` as micro-batches [(z, y, t, noise, drop_ids or None)] on ``device``."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if data.encoder is not None:
        with torch.no_grad():  # the frozen encoder runs in fp32, outside DDP and autocast (official)
            x = torch.cat([data.encoder.encode(c) for c in x.split(micro)])  # (B, C, h, w)
    z = normalize_latents(x.float(), mean, var, cfg.rae.eps)
    draws = step_draws(cfg, step, shift)
    t = draws.t[pos].to(device)
    r = None
    if cfg.objective == "meanflow":  # MeanFlow draws its own (r, t) pair, from (seed, step) too
        from rae_cli.meanflow import draw_times

        r, t = (a[pos].to(device) for a in draw_times(cfg.meanflow, cfg.flow, cfg.seed, step,
                                                      cfg.global_batch_size, shift))
    p = cfg.dit.class_dropout_prob
    drop = (draws.u_drop[pos] < p).long().to(device) if p > 0 else None  # 1 → the null label (CFG dropout)
    noise = noise_for(cfg, step, pos, data.latent_shape, device)
    return [(z[i:i + micro], y[i:i + micro], t[i:i + micro], noise[i:i + micro],
             None if drop is None else drop[i:i + micro], None if r is None else r[i:i + micro])
            for i in range(0, len(pos), micro)]


def _meanflow_objective(cfg: TrainDiTConfig, model: torch.nn.Module, data: _Data, shift: float, device):
    """objective=meanflow: load the frozen teacher, put the initial weights into ``model`` (a resumed run then
    overwrites them from its checkpoint) and return the loss; None for flow matching."""
    if cfg.objective != "meanflow":
        return None
    from rae_cli import meanflow

    if cfg.meanflow.stage == "consistency" and not cfg.teacher:
        raise ConfigError("meanflow.stage=consistency needs a flow-matching teacher (teacher=RUN)")
    teacher = meanflow.load_teacher(cfg.teacher, device, data.latent_shape, data.num_classes) if cfg.teacher \
        else None
    meanflow.initialise(model, cfg.meanflow.init, cfg.teacher)
    null_label = data.num_classes if cfg.dit.class_dropout_prob > 0 else -1
    if cfg.meanflow.guided and null_label < 0:
        raise ConfigError("meanflow guidance needs a model trained with label dropout (dit.class_dropout_prob > 0)")
    return meanflow.MeanFlowLoss(cfg.meanflow, null_label, teacher, shift)


def _save(ckroot: Path, step: int, cfg: TrainDiTConfig, plan: Plan, model, ema, optimizer, data: _Data,
          shift: float, stats_path: str | None, world: int) -> None:
    """Checkpoint ``step`` (rank 0), then apply the retention policy."""
    from rae_cli.run_dir import apply_retention, save_checkpoint

    save_checkpoint(
        ckroot, step, weights={"model": model.state_dict(), "ema": ema.state_dict()},
        resume_state={"step": step, "optimizer": optimizer.state_dict(),
                      "global_batch_size": cfg.global_batch_size, "world_size": world},
        config=cfg,
        meta={"epoch": step / plan.steps_per_epoch, "images_seen": step * cfg.global_batch_size,
              "model": cfg.dit.name, "latent_shape": list(data.latent_shape), "num_classes": data.num_classes,
              "classes": data.classes, "shift": shift, "stats": stats_path, "total_steps": plan.total_steps})
    apply_retention(ckroot, keep_last=cfg.keep_last, keep_every=plan.keep_every)


def train_dit(*, cfg: TrainDiTConfig, out_dir: str | Path) -> Path:
    """Train (or resume training) into ``out_dir``; returns the last checkpoint folder.

    Under torchrun every process calls this; rank 0 writes. Stops with :class:`NonFiniteError` on a NaN/Inf
    loss or gradient, keeping every checkpoint saved before it.
    """
    from rae_cli import distributed

    dist = distributed.init(cfg.device)
    try:
        return _train(cfg, Path(out_dir), dist)
    finally:
        distributed.shutdown()


def _train(cfg: TrainDiTConfig, out: Path, dist) -> Path:
    from torch.nn.parallel import DistributedDataParallel

    from rae_cli import distributed, faults
    from rae_cli.config import save_resolved, to_dict
    from rae_cli.ema import EMA
    from rae_cli.checkpoint import strict_load
    from rae_cli.latent_stats import load_stats
    from rae_cli.run_dir import MetricsLogger, check_loggers, checkpoint_name, clean_temporary, latest_checkpoint

    check_loggers(tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    cfg = _sources_from_previous_run(cfg, out)
    data = _open_data(cfg, device)
    shift = cfg.flow.resolved_shift(data.latent_shape)
    stats_path = _resolve_stats_path(data.stats_path)
    cfg = _resolved(cfg, data, stats_path, shift)
    plan = Plan.of(cfg, data.num_images)
    world = dist.world_size
    if cfg.global_batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} must be divisible by processes × "
                          f"grad_accum_steps = {world} × {cfg.grad_accum_steps}")
    micro = cfg.global_batch_size // (world * cfg.grad_accum_steps)

    model = build_model(cfg, data.latent_shape, data.num_classes).to(device)
    objective = _meanflow_objective(cfg, model, data, shift, device)  # None for flow matching
    ema = EMA(model, cfg.ema_decay)  # equal to the model: in sync on every rank from the start
    optimizer = make_optimizer(model, cfg.optim, device)
    ckroot = out / "checkpoints"
    start = 0
    last = latest_checkpoint(ckroot)
    if last is not None:
        strict_load(model, last.weights("model"), f"model weights {last.path}")
        ema.load_state_dict(last.weights("ema"), f"EMA weights {last.path}")
        state = last.resume_state()
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the config wins over the saved hyperparameters
            group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        start = int(state["step"])
        if int(state.get("global_batch_size", cfg.global_batch_size)) != cfg.global_batch_size:
            log.warning("resuming with a different global batch size: the data order changes from here on")
    with distributed.main_first(dist):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            clean_temporary(ckroot)
            if last is not None and (out / "config.yaml").is_file():
                from rae_cli.config import read_yaml

                _warn_changes(read_yaml(out / "config.yaml"), to_dict(cfg))
            save_resolved(cfg, out / "config.yaml")
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("train-dit: %s (%.2fM params) on %s latents, %d images, %d classes, shift %.4f; %d steps/epoch, "
                 "steps %d → %d of %d; %d process(es) × %d micro-batches of %d", cfg.dit.name, n_params / 1e6,
                 list(data.latent_shape), data.num_images, data.num_classes, shift, plan.steps_per_epoch, start,
                 plan.stop_step, plan.total_steps, world, cfg.grad_accum_steps, micro)

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False) if dist.enabled else None
    model_fn = ddp if ddp is not None else model
    if cfg.compile:
        model_fn = torch.compile(model_fn)
    model.train()
    mean = var = None
    if stats_path is not None:
        mean, var = (t.to(device) for t in load_stats(stats_path))
        if tuple(mean.shape) != tuple(data.latent_shape):
            raise ConfigError(f"latent statistics {stats_path} have shape {tuple(mean.shape)}, the latents "
                              f"{tuple(data.latent_shape)}")

    batches = StepBatches(cfg, data.source, data.num_images, plan.steps_per_epoch, dist.rank, world, shift)
    loader = torch.utils.data.DataLoader(batches, sampler=range(start, plan.stop_step), batch_size=None,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                         collate_fn=_collate_step)
    metrics = MetricsLogger(out, start_step=start, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                            wandb=cfg.wandb, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    saved_step = last.step if last is not None else None
    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
    try:
        with _progress(dist.is_main) as progress:
            task = progress.add_task("train", total=plan.stop_step, completed=start, info="")
            for step, (x, y, pos) in zip(range(start, plan.stop_step), loader):
                micro_batches = _micro_batches(cfg, step, shift, x, y, pos, data, mean, var, micro, device)
                lr = plan.lr(cfg, step)
                try:
                    loss, gnorm = train_step(model_fn=model_fn, raw_model=model, optimizer=optimizer, ema=ema,
                                             micro_batches=micro_batches, lr=lr, clip_grad=cfg.optim.clip_grad,
                                             precision=cfg.precision, no_sync=ddp.no_sync if ddp else None,
                                             dist=dist, step=step + 1, objective=objective)
                except NonFiniteError as e:
                    where = (f"the last good checkpoint is {ckroot / checkpoint_name(saved_step)} (step {saved_step}); "
                             "it is kept" if saved_step is not None else "no checkpoint had been saved yet")
                    raise NonFiniteError(
                        f"training stopped at step {step + 1}: {e}. Nothing from this step on was saved; {where}. "
                        f"Usual causes: a learning rate too high (lr={lr:g}) or bf16 overflow — lower optim.lr or "
                        "use precision=fp32, then re-run the same command to resume from the last checkpoint."
                    ) from None
                done = step + 1
                faults.point("train-step", done)
                window_loss += loss
                window_steps += 1
                progress.update(task, completed=done, info=f"loss {loss:.4f} lr {lr:.2e}")
                if done % cfg.log_every == 0 or done == plan.stop_step:
                    elapsed = time.perf_counter() - window_t0
                    metrics.log(done, {"epoch": done / plan.steps_per_epoch, "loss": window_loss / window_steps,
                                       "lr": lr, "grad_norm": gnorm,
                                       "imgs_per_s": window_steps * cfg.global_batch_size / max(elapsed, 1e-9)})
                    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
                if done % plan.ckpt_every == 0 or done == plan.stop_step:
                    if dist.is_main:
                        _save(ckroot, done, cfg, plan, model, ema, optimizer, data, shift, stats_path, world)
                    saved_step = done
                    distributed.barrier(dist)
    finally:
        metrics.close()
    final = latest_checkpoint(ckroot) if dist.is_main else None
    if dist.is_main:
        log.info("train-dit: done at step %d; checkpoint %s", plan.stop_step, final.path if final else None)
    return final.path if final else ckroot / checkpoint_name(plan.stop_step)


# ----------------------------------------------------------------------------------------------------------------
# Reading a trained model back


def load_trained_dit(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
                     ) -> tuple[torch.nn.Module, TrainDiTConfig]:
    """(model in eval mode, resolved config) from a checkpoint folder or run folder (latest checkpoint).

    The config carries everything a sampler needs: ``rae`` (with the stats used), ``dit``, ``flow.shift``,
    ``num_classes`` and ``latent_shape``.
    """
    from rae_cli.build import build_dit_model
    from rae_cli.checkpoint import strict_load
    from rae_cli.config import load_resolved
    from rae_cli.run_dir import CONFIG_FILE, resolve_checkpoint

    ck = resolve_checkpoint(path)
    cfg = load_resolved(TrainDiTConfig, ck.path / CONFIG_FILE)
    model = build_dit_model(cfg.dit, cfg.latent_shape, cfg.num_classes)
    strict_load(model, ck.weights(weights), f"{weights} weights {ck.path}")
    return model.to(device).eval(), cfg
