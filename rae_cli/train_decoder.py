"""Stage-1 training (paper §3, spec §2): the ViT decoder learns to invert a frozen encoder, with L1 + LPIPS + GAN.

One iteration (spec §2.3): a generator step on the noisy latents (τ), then a discriminator step on 8-bit fakes from
the updated decoder in eval mode. Differences from the official trainer (spec §10.1), each on purpose: the
discriminator heads are trained through their own DDP wrapper, so their gradients are all-reduced (the official code
trains one unsynchronised discriminator per GPU); the generator step calls the bare discriminator with its parameters
frozen, so it neither accumulates nor all-reduces D gradients; gradient accumulation uses ``no_sync``; fp16 keeps
one GradScaler per optimizer; the EMA covers the decoder only; checkpoints hold the decoder, its EMA and the
discriminator heads (the frozen encoder is referenced by the config, never saved); every random draw is derived from
(seed, rank, step), so a resumed run continues bit-identically (on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, List, Optional, Sequence

import numpy as np
import torch

from rae_cli import faults
from rae_cli.config import ConfigError, doc
from rae_cli.errors import DataError, RaeError
from rae_cli.schema import RAEConfig

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN_KIND = "train-decoder"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"

# Keys a re-run may change without breaking bit-identical resume (they steer logging, saving and stopping only).
RUNTIME_KEYS = ("train.stop_after", "train.log_every", "train.ckpt_every", "train.keep_last", "train.keep_every",
                "train.eval_every", "train.device", "train.dist_timeout", "data.num_workers")

# Random streams: every draw is seeded by derive_seed(seed, rank, step, ...) so that resume = rerun. Image crops
# use (seed, rank, step, i) with i the sample's index in this rank's share of the step; the others add a tag.
_NOISE, _AUG_G, _AUG_FAKE, _AUG_REAL = 1, 2, 3, 4
_ORDER_TAG, _HOLDOUT_TAG = 1001, 1002


# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class DecoderDataConfig:
    """Training images: a folder (recursive); stage-1 transform = bicubic resize of the short side, random crop."""

    path: Optional[str] = doc("Image folder (class sub-folders or flat, searched recursively).", None)
    resize_scale: float = doc("Short side is resized (bicubic) to resize_scale·image_size before the random crop "
                              "(official: 1.5, i.e. 384 for 256² crops). No flip.", 1.5)
    holdout: int = doc("Images held out of training for the periodic PSNR/SSIM check (ADM center crop); 0 = none.",
                       16)
    num_workers: int = doc("Image-decoding worker processes per training process (0 = in the main process).", 8)

    def validate(self) -> None:
        if self.resize_scale < 1.0:
            raise ConfigError("data.resize_scale must be ≥ 1 (the random crop needs the resized short side ≥ size)")
        if self.holdout < 0 or self.num_workers < 0:
            raise ConfigError("data.holdout and data.num_workers must be ≥ 0")


@dataclass
class DecoderTrainConfig:
    """Optimisation of the decoder (spec §2.1) and the run's bookkeeping."""

    epochs: float = doc("Training length in epochs (steps = round(epochs · steps_per_epoch)).", 16.0)
    global_batch_size: int = doc("Images per optimizer step, over all processes and accumulation steps.", 512)
    micro_batch_size: Optional[int] = doc("Images per forward pass per process; gradient accumulation makes up the "
                                          "global batch. null = global_batch_size / world size (no accumulation).",
                                          None)
    lr: float = doc("Peak AdamW learning rate.", 2e-4)
    final_lr: float = doc("Learning rate at the end of the cosine.", 2e-5)
    betas: List[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.95])
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    adam_eps: float = doc("AdamW epsilon.", 1e-8)
    schedule: str = doc("LR schedule (for the decoder and the discriminator): cosine, linear or constant.", "cosine")
    warmup_epochs: float = doc("Warmup length in epochs.", 1.0)
    warmup_from_zero: bool = doc("Warmup ramps linearly from 0 (true) or holds the peak LR (false).", True)
    ema_decay: float = doc("EMA decay of the decoder weights (0.9978 ≈ 315-step half-life).", 0.9978)
    clip_grad: float = doc("Clip the decoder's gradient norm to this value; 0 = no clipping (official).", 0.0)
    precision: str = doc("fp32, bf16 (autocast) or fp16 (autocast + one GradScaler per optimizer).", "fp32")
    grad_checkpointing: bool = doc("Recompute decoder activations in backward (saves memory, ~30% slower).", False)
    seed: int = doc("Seed of the data order, crops, latent noise and DiffAug (derived per rank and step).", 0)
    device: str = doc("auto, cpu or cuda (under torchrun: the local GPU).", "auto")
    dist_timeout: Optional[float] = doc("Under torchrun: minutes a collective waits for the other processes before "
                                        "the job fails (null = torch's default: NCCL 10, gloo 30).", None)
    log_every: int = doc("Log averaged losses every this many steps.", 100)
    ckpt_every: int = doc("Save a checkpoint every this many steps (and always at the end).", 2500)
    keep_last: int = doc("Keep this many newest checkpoints.", 2)
    keep_every: Optional[int] = doc("Also keep checkpoints whose step is a multiple of this (null = none).", None)
    eval_every: int = doc("Reconstruct the held-out images with the EMA decoder (PSNR/SSIM, a grid) every this many "
                          "steps (and at the end); 0 = only at the end.", 2500)
    stop_after: Optional[int] = doc("Stop (after saving) once this step is reached, without changing the schedule "
                                    "(for time-limited jobs; re-run the command to continue). null = train to the end.",
                                    None)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule must be cosine, linear or constant, not {self.schedule!r}")
        if self.epochs <= 0 or self.global_batch_size < 1:
            raise ConfigError("train.epochs must be > 0 and train.global_batch_size ≥ 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError("train.micro_batch_size must be ≥ 1 (or null)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1]")
        if min(self.log_every, self.ckpt_every, self.keep_last) < 1 or self.eval_every < 0:
            raise ConfigError("train.log_every, ckpt_every and keep_last must be ≥ 1 and eval_every ≥ 0")


@dataclass
class DecoderLossConfig:
    """L_rec = L1 + perceptual_weight·LPIPS; total = L_rec + disc_weight·d·L_gan with d the adaptive weight."""

    perceptual_weight: float = doc("LPIPS weight.", 1.0)
    lpips_start: float = doc("Epoch at which LPIPS joins the loss.", 0.0)
    lpips_weights: Optional[str] = doc("torchvision VGG16 weights file (vgg16-397923af.pth); null = the torch hub "
                                       "cache (`rae download vgg16`).", None)
    lpips_random_init: bool = doc("TEST ONLY: a random VGG16 trunk (the loss is then not perceptual).", False)
    disc_weight: float = doc("Weight of the generator's GAN term (times the adaptive weight); 0 switches the GAN "
                             "off entirely (no discriminator is built, no DINO weights needed).", 0.75)
    disc_upd_start: float = doc("Epoch at which the discriminator starts training.", 6.0)
    disc_start: float = doc("Epoch at which the generator's GAN term starts.", 8.0)
    max_d_weight: float = doc("Upper clamp of the adaptive weight ‖∇L_rec‖/‖∇L_gan‖.", 1e4)
    disc_loss: str = doc("Discriminator loss (hinge).", "hinge")
    gen_loss: str = doc("Generator GAN loss (vanilla: −mean D(fake) on raw logits).", "vanilla")
    disc_updates: int = doc("Discriminator updates per training step.", 1)

    def validate(self) -> None:
        if self.disc_loss != "hinge" or self.gen_loss != "vanilla":
            raise ConfigError("only loss.disc_loss=hinge and loss.gen_loss=vanilla are implemented (the paper's)")
        if min(self.lpips_start, self.disc_upd_start, self.disc_start) < 0:
            raise ConfigError("loss.lpips_start, disc_upd_start and disc_start are epochs ≥ 0")
        if self.perceptual_weight < 0 or self.disc_weight < 0 or self.max_d_weight < 0 or self.disc_updates < 1:
            raise ConfigError("loss weights must be ≥ 0 and loss.disc_updates ≥ 1")

    @property
    def gan_enabled(self) -> bool:
        return self.disc_weight > 0


@dataclass
class DiscConfig:
    """The DINO discriminator (spec §2.5): frozen ViT backbone + trainable spectral-norm heads, DiffAug inputs."""

    weights: Optional[str] = doc("DINO ViT weights (dino_deitsmall8_pretrain.pth); null = the torch hub cache "
                                 "(`rae download dino-vits8`).", None)
    random_init: bool = doc("TEST ONLY: a random backbone (the discriminator then judges nothing meaningful).", False)
    img_size: int = doc("Backbone input size (inputs are resized bilinearly).", 224)
    patch_size: int = doc("Backbone patch size.", 8)
    embed_dim: int = doc("Backbone width.", 384)
    depth: int = doc("Backbone depth.", 12)
    num_heads: int = doc("Backbone heads.", 6)
    key_depths: List[int] = doc("Blocks whose tokens feed a head (plus the last block).", factory=lambda: [2, 5, 8, 11])
    ks: int = doc("Kernel size of the heads' residual conv.", 9)
    norm_eps: float = doc("Epsilon of the heads' per-sample norm and the backbone LayerNorms.", 1e-6)
    lr: float = doc("Peak AdamW learning rate of the heads.", 2e-4)
    final_lr: float = doc("Final learning rate of the heads.", 2e-5)
    betas: List[float] = doc("AdamW betas of the heads.", factory=lambda: [0.9, 0.95])
    weight_decay: float = doc("AdamW weight decay of the heads.", 0.0)
    aug_prob: float = doc("DiffAug probability of each op.", 1.0)
    aug_cutout: float = doc("DiffAug cutout size as a fraction of the image (0 = off).", 0.0)
    aug_translation: float = doc("DiffAug max translation as a fraction of the image.", 0.125)

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"disc.betas must be two numbers in [0, 1), got {self.betas}")
        if self.img_size % self.patch_size:
            raise ConfigError("disc.img_size must be a multiple of disc.patch_size")

    def arch(self) -> dict[str, Any]:
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, key_depths=tuple(self.key_depths), ks=self.ks, norm_eps=self.norm_eps)


@dataclass
class TrainDecoderConfig:
    """``rae train-decoder``: train an RAE decoder on a frozen encoder (paper §3, spec §2)."""

    preset_kind: ClassVar[str] = "train-decoder"

    rae: RAEConfig = doc("The autoencoder (a string names an rae preset). noise_tau is the training noise τ; "
                         "decoder_weights (optional) starts from trained weights; stats (optional) are carried into "
                         "the export (they cancel out in training: the decoder sees raw latents either way).",
                         factory=RAEConfig)
    data: DecoderDataConfig = doc("Training images.", factory=DecoderDataConfig)
    train: DecoderTrainConfig = doc("Optimisation and bookkeeping.", factory=DecoderTrainConfig)
    loss: DecoderLossConfig = doc("Loss weights and their schedule.", factory=DecoderLossConfig)
    disc: DiscConfig = doc("The discriminator.", factory=DiscConfig)


# ---------------------------------------------------------------------------------------------------------------
# Data: a step-indexed sampler, so the batches of step s are a function of (seed, rank, s) alone


class _CropDataset(torch.utils.data.Dataset):
    """Item (file index, crop seed) → the stage-1 random crop (3, S, S) in [0, 1]."""

    def __init__(self, files: Sequence[Path], image_size: int, scale: float):
        self.files, self.image_size, self.scale = list(files), image_size, scale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        from rae_cli.data import open_rgb, resize_short_random_crop, to_tensor

        index, seed = item
        image = open_rgb(self.files[index])  # DataError names the file
        crop = resize_short_random_crop(image, self.image_size, np.random.default_rng(seed), scale=self.scale)
        return to_tensor(crop)


@dataclass(frozen=True)
class Plan:
    """The run's shape, derived from the config, the data and the world size (never typed in twice)."""

    num_train: int
    steps_per_epoch: int
    total_steps: int
    micro_batch: int
    accum: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum


def make_plan(cfg: TrainDecoderConfig, num_train: int, world_size: int) -> Plan:
    g = cfg.train.global_batch_size
    if g % world_size:
        raise ConfigError(f"train.global_batch_size={g} is not divisible by the {world_size} processes")
    micro = cfg.train.micro_batch_size or g // world_size
    if g % (micro * world_size):
        raise ConfigError(f"train.global_batch_size={g} is not a multiple of micro_batch_size·processes = "
                          f"{micro}·{world_size}")
    steps_per_epoch = num_train // g  # drop_last, as the official DistributedSampler loader
    if steps_per_epoch == 0:
        raise DataError(f"{num_train} training images are fewer than one global batch ({g}); add images or lower "
                        "train.global_batch_size")
    total = max(1, round(cfg.train.epochs * steps_per_epoch))
    return Plan(num_train, steps_per_epoch, total, micro, g // (micro * world_size), world_size)


def split_holdout(files: Sequence[Path], holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files): ``holdout`` files picked by a seeded permutation; the rest keep their order."""
    if holdout >= len(files):
        raise DataError(f"data.holdout={holdout} leaves no training images out of {len(files)}")
    from rae_cli.distributed import derive_seed

    picked = set(np.random.default_rng(derive_seed(seed, _HOLDOUT_TAG)).permutation(len(files))[:holdout].tolist())
    train = [f for i, f in enumerate(files) if i not in picked]
    held = [f for i, f in enumerate(files) if i in picked]
    return train, held


def step_items(plan: Plan, step: int, *, seed: int, rank: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of ``step``: lists of (file index, crop seed).

    Each epoch shuffles the training files with a seed of (seed, epoch); step k of the epoch takes the global batch
    perm[k·G:(k+1)·G], of which rank r takes the r-th contiguous share. Crop seeds are (seed, rank, step, i).
    """
    from rae_cli.distributed import derive_seed

    epoch, k = divmod(step, plan.steps_per_epoch)
    perm = np.random.default_rng(derive_seed(seed, _ORDER_TAG, epoch)).permutation(plan.num_train)
    start = k * plan.per_rank * plan.world_size + rank * plan.per_rank
    share = perm[start:start + plan.per_rank]
    items = [(int(idx), derive_seed(seed, rank, step, i)) for i, idx in enumerate(share)]
    return [items[m * plan.micro_batch:(m + 1) * plan.micro_batch] for m in range(plan.accum)]


class _StepSampler:
    """Yields the micro-batches of steps [start, end) in order (a DataLoader batch_sampler)."""

    def __init__(self, plan: Plan, start: int, end: int, seed: int, rank: int):
        self.plan, self.start, self.end, self.seed, self.rank = plan, start, end, seed, rank

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            yield from step_items(self.plan, step, seed=self.seed, rank=self.rank)


def _steps(loader, accum: int) -> Iterator[list[torch.Tensor]]:
    """Group the loader's micro-batches by step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


# ---------------------------------------------------------------------------------------------------------------
# Building the pieces


def build_disc(cfg: DiscConfig, seed: int):
    from rae_cli.discriminator import build_dino_discriminator

    torch.manual_seed(seed)  # head init; identical on every rank (DDP would broadcast rank 0's anyway)
    return build_dino_discriminator(cfg.weights, random_init=cfg.random_init, **cfg.arch())


def _ddp(module: torch.nn.Module, device: torch.device, sync_buffers: bool):
    """DDP over ``module``'s trainable parameters; ``sync_buffers=False`` skips the per-forward buffer broadcast."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None}
    if not sync_buffers:  # torch ≥ 2.14 renamed the flag (buffers are still synced once at construction)
        flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
            "broadcast_buffers"
        kwargs[flag] = False
    return DDP(module, **kwargs)


def _adamw(params, lr: float, betas, weight_decay: float, eps: float, device: torch.device):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps,
                             fused=device.type == "cuda")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _lr(step: int, plan: Plan, cfg: DecoderTrainConfig, base: float, final: float) -> float:
    from rae_cli.lr_schedule import lr_at

    return lr_at(step, kind=cfg.schedule, base_lr=base, final_lr=final,
                 warmup=round(cfg.warmup_epochs * plan.steps_per_epoch), warmup_from_zero=cfg.warmup_from_zero,
                 total=plan.total_steps, decay_end=plan.total_steps)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _check_same_run(cfg: TrainDecoderConfig, saved: Path) -> None:
    """A re-run into an existing folder must describe the same training (runtime keys aside)."""
    from rae_cli.config import read_yaml, to_dict

    old = _flatten({k: v for k, v in read_yaml(saved).items() if k in {f.name for f in dataclasses.fields(cfg)}})
    new = _flatten(to_dict(cfg))
    diff = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS and old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{saved.parent} holds a run with a different config ({shown}). Re-run with the same "
                          f"settings to resume (only {', '.join(RUNTIME_KEYS)} may change), or use a new --out.")


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What ``train_decoder`` leaves behind (the modules are this process's copies)."""

    out_dir: Path
    step: int
    plan: Plan
    decoder: torch.nn.Module
    ema_decoder: torch.nn.Module
    disc: torch.nn.Module
    last_eval: dict = dataclasses.field(default_factory=dict)


def train_decoder(*, cfg: TrainDecoderConfig, out_dir: str | Path) -> TrainResult:
    """Train ``cfg.rae``'s decoder on ``cfg.data.path``; write checkpoints, metrics and the export into ``out_dir``.

    Runs on 1 process or under torchrun (DDP). Re-running the same call resumes from the newest checkpoint and
    continues bit-identically (on CPU; GPU kernels may differ in the last bits).
    """
    from rae_cli import distributed, run_dir
    from rae_cli.build import build_rae
    from rae_cli.config import save_resolved
    from rae_cli.data import list_images
    from rae_cli.diffaug import DiffAug
    from rae_cli.ema import EMA
    from rae_cli.gan_losses import GanSchedule
    from rae_cli.perceptual import build_lpips

    if not cfg.data.path:
        raise ConfigError("data.path is not set: give the training image folder")
    dist = distributed.init(cfg.train.device, cfg.train.dist_timeout)
    device = dist.device
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"

    files = list_images(cfg.data.path)
    train_files, held_files = split_holdout(files, cfg.data.holdout, cfg.train.seed)
    plan = make_plan(cfg, len(train_files), dist.world_size)

    with distributed.main_first(dist):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if (out / "config.yaml").is_file():
                _check_same_run(cfg, out / "config.yaml")
            save_resolved(cfg, out / "config.yaml", extra={"kind": RUN_KIND})
            run_dir.clean_temporary(ckpt_root)

    # -- models (the loss networks first: missing weights fail before the encoder is loaded) --------------------
    lpips = None
    if cfg.loss.perceptual_weight > 0:  # no VGG weights needed when LPIPS is switched off
        torch.manual_seed(cfg.train.seed)  # a random-init LPIPS trunk (tests) is the same on every rank
        lpips = build_lpips(cfg.loss.lpips_weights, random_init=cfg.loss.lpips_random_init).to(device)
    gan = cfg.loss.gan_enabled
    disc = build_disc(cfg.disc, cfg.train.seed).to(device) if gan else None
    rae = build_rae(cfg.rae, device=device)
    rae.decoder.grad_checkpointing = cfg.train.grad_checkpointing
    decoder = rae.decoder
    image_size = rae.image_size
    if cfg.rae.encoder_random_init or (gan and cfg.disc.random_init) or cfg.loss.lpips_random_init:
        log.warning("TEST-ONLY random-init networks in use (encoder=%s, discriminator backbone=%s, LPIPS VGG=%s): "
                    "this run does not train a usable decoder", cfg.rae.encoder_random_init, cfg.disc.random_init,
                    cfg.loss.lpips_random_init)
    ema = EMA(decoder, cfg.train.ema_decay)
    opt_g = _adamw([p for p in decoder.parameters() if p.requires_grad], cfg.train.lr, cfg.train.betas,
                   cfg.train.weight_decay, cfg.train.adam_eps, device)
    opt_d = _adamw(list(disc.parameters()), cfg.disc.lr, cfg.disc.betas, cfg.disc.weight_decay,
                   cfg.train.adam_eps, device) if gan else None
    fp16 = cfg.train.precision == "fp16"
    scaler_g = torch.amp.GradScaler(device.type, enabled=fp16)  # one per optimizer (official: shared, §10.1 #9)
    scaler_d = torch.amp.GradScaler(device.type, enabled=fp16)

    # -- resume ----------------------------------------------------------------------------------------------
    start = 0
    ckpt = distributed.from_main(run_dir.latest_checkpoint(ckpt_root), dist)  # every rank resumes from rank 0's pick
    if ckpt is not None:
        start = _load_checkpoint(ckpt, plan, decoder=decoder, ema=ema, disc=disc, opt_g=opt_g, opt_d=opt_d,
                                 scaler_g=scaler_g, scaler_d=scaler_d)
        if dist.is_main:
            log.info("resuming from %s (step %d of %d)", ckpt.path, start, plan.total_steps)
            _truncate_metrics(out / METRICS_FILE, start)

    # -- DDP: the decoder (through the RAE) and the discriminator heads each get their own wrapper ---------------
    rae_model, disc_model = rae, disc
    if dist.enabled:
        rae_model = _ddp(rae, device, sync_buffers=False)  # only the decoder has trainable params; no buffer changes
        if gan:  # D gradients are all-reduced (official: not, §10.1 #8)
            disc_model = _ddp(disc, device, sync_buffers=True)

    schedule = GanSchedule(cfg.loss.lpips_start, cfg.loss.disc_upd_start, cfg.loss.disc_start, plan.steps_per_epoch)
    diffaug = DiffAug(cfg.disc.aug_prob, cfg.disc.aug_cutout, cfg.disc.aug_translation)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[cfg.train.precision] or torch.float32,
                              enabled=cfg.train.precision != "fp32")
    ctx = _StepContext(cfg=cfg, plan=plan, dist=dist, rae=rae, rae_model=rae_model, disc=disc, disc_model=disc_model,
                       lpips=lpips, diffaug=diffaug, schedule=schedule, autocast=autocast)

    held = ema_rae = None
    if held_files and dist.is_main:
        from rae_cli.data import load_batch
        from rae_cli.rae import RAE

        held, _, _ = load_batch(held_files, image_size, crop="adm")
        # The EMA decoder behind the same (shared) frozen encoder and statistics, in eval mode: no latent noise.
        ema_rae = RAE(rae.encoder, ema.module, input_size=rae.input_size, noise_tau=0.0, latent_mean=rae.latent_mean,
                      latent_var=rae.latent_var, eps=rae.eps).to(device).eval()

    if dist.is_main:
        log.info("train-decoder: %d training images (%d held out), %d steps/epoch, %d steps, global batch %d = "
                 "%d processes × %d micro-batch × %d accumulation, %s, decoder %.1fM params",
                 plan.num_train, len(held_files), plan.steps_per_epoch, plan.total_steps,
                 cfg.train.global_batch_size, dist.world_size, plan.micro_batch, plan.accum, cfg.train.precision,
                 sum(p.numel() for p in decoder.parameters() if p.requires_grad) / 1e6)

    end = plan.total_steps if cfg.train.stop_after is None else min(plan.total_steps, max(start, cfg.train.stop_after))
    loader = torch.utils.data.DataLoader(
        _CropDataset(train_files, image_size, cfg.data.resize_scale),
        batch_sampler=_StepSampler(plan, start, end, cfg.train.seed, dist.rank),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False)

    last_eval: dict = {}
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    step = start
    progress = _progress(dist.is_main)
    with progress:
        task = progress.add_task("train-decoder", total=plan.total_steps, completed=start)
        for micro_batches in _steps(loader, plan.accum):
            images = [x.to(device, non_blocking=True) for x in micro_batches]
            rae.train()
            lr_g = _lr(step, plan, cfg.train, cfg.train.lr, cfg.train.final_lr)
            _set_lr(opt_g, lr_g)
            stats = ctx.generator_step(images, step, opt_g, scaler_g)
            ema.update(decoder)
            if gan and schedule.update_disc(step):
                for u in range(cfg.loss.disc_updates):
                    d_step = (step - schedule.disc_update_start_step) * cfg.loss.disc_updates + u
                    # The disc schedule advances only while D trains (official behaviour, spec §2.3).
                    _set_lr(opt_d, _lr(d_step, plan, cfg.train, cfg.disc.lr, cfg.disc.final_lr))
                    stats.update(ctx.disc_step(images, step, u, opt_d, scaler_d))
                stats["lr_d"] = opt_d.param_groups[0]["lr"]
            stats["lr"] = lr_g
            step += 1
            faults.point("train-step", step)
            progress.advance(task)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1

            if step % cfg.train.log_every == 0 or step == end:
                row = _reduce_log(sums, count, dist)
                row.update(step=step, epoch=step / plan.steps_per_epoch,
                           images_per_s=count * cfg.train.global_batch_size / max(time.time() - t0, 1e-9))
                if dist.is_main:
                    _append_metrics(out / METRICS_FILE, row)
                    log.info("step %d/%d %s", step, plan.total_steps,
                             "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step",)))
                sums, count, t0 = {}, 0, time.time()
            if held is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                     or step == plan.total_steps):
                last_eval = evaluate(ema_rae, held, out / "samples" / f"{run_dir.checkpoint_name(step)}.png")
                _append_metrics(out / METRICS_FILE, {"step": step, **{f"eval_{k}": v for k, v in last_eval.items()}})
                log.info("step %d eval (EMA decoder, held-out): PSNR %.2f dB  SSIM %.4f", step, last_eval["psnr"],
                         last_eval["ssim"])
            if step % cfg.train.ckpt_every == 0 or step == end:
                _save_checkpoint(cfg, ckpt_root, step, plan, dist, decoder=decoder, ema=ema, disc=disc, opt_g=opt_g,
                                 opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d)

    if step == plan.total_steps and dist.is_main:
        export_trained_decoder(run_dir.latest_checkpoint(ckpt_root).path, out / EXPORT_DIR)
    distributed.barrier(dist)
    return TrainResult(out, step, plan, decoder, ema.module, disc, last_eval)


@dataclass
class _StepContext:
    """The pieces one training step needs; ``generator_step`` and ``disc_step`` are spec §2.3's two halves."""

    cfg: TrainDecoderConfig
    plan: Plan
    dist: Any
    rae: Any  # the bare RAE (its decoder is the trained module)
    rae_model: Any  # the RAE, DDP-wrapped when distributed
    disc: Any  # the bare discriminator
    disc_model: Any  # the discriminator, DDP-wrapped when distributed
    lpips: Any
    diffaug: Any
    schedule: Any
    autocast: Any

    def _gen(self, step: int, *tags: int) -> torch.Generator:
        from rae_cli.distributed import generator

        return generator(self.cfg.train.seed, self.dist.rank, step, *tags, device=self.rae.image_mean.device)

    def _no_sync(self, model, last: bool):
        """Skip the all-reduce on all but the last micro-batch of a step (working gradient accumulation)."""
        return model.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()

    def generator_step(self, images: list[torch.Tensor], step: int, opt: torch.optim.Optimizer,
                       scaler) -> dict[str, float]:
        """L1 + LPIPS (+ adaptive-weighted GAN) on the noisy-latent reconstructions; one optimizer step."""
        from rae_cli.gan_losses import adaptive_weight, vanilla_g_loss

        cfg, sched = self.cfg.loss, self.schedule
        use_lpips, use_gan = sched.use_lpips(step), cfg.gan_enabled and sched.use_gan(step)
        last_layer = self.rae.decoder.decoder_pred.weight
        # The bare discriminator, frozen and in eval mode: gradients reach the fakes only, so the G step neither
        # fills D's .grad nor triggers D's all-reduce (official: it runs through the DDP wrapper, spec §10.1 #8).
        if self.disc is not None:
            self.disc.eval().requires_grad_(False)
        out: dict[str, float] = {}
        accum = len(images)
        for m, x in enumerate(images):
            with self._no_sync(self.rae_model, last=m == accum - 1):
                with self.autocast:
                    recon = self.rae_model(x, generator=self._gen(step, _NOISE, m))  # τ noise on the latents
                    rec = (recon.float() - x).abs().mean()  # L1 on the [0, 1] scale
                    lp = (self.lpips(x * 2 - 1, recon * 2 - 1).float() if use_lpips and self.lpips is not None
                          else torch.zeros((), device=x.device))
                    rec_loss = rec + cfg.perceptual_weight * lp
                    if use_gan:
                        fake = self.diffaug(recon * 2 - 1, self._gen(step, _AUG_G, m))  # not clamped (official)
                        gan = vanilla_g_loss(self.disc(fake))
                if use_gan:
                    d_weight = adaptive_weight(rec_loss, gan, last_layer, cfg.max_d_weight)  # outside autocast
                    total = rec_loss + cfg.disc_weight * d_weight * gan
                else:
                    total = rec_loss
                scaler.scale(total / accum).backward()
            _accumulate(out, accum, l1=rec, lpips=lp, loss=total,
                        **({"gan_g": gan, "d_weight": d_weight} if use_gan else {}))
        if self.cfg.train.clip_grad > 0:
            scaler.unscale_(opt)
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.rae.decoder.parameters(),
                                                                    self.cfg.train.clip_grad))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if self.disc is not None:
            self.disc.requires_grad_(True)
        return out

    def disc_step(self, images: list[torch.Tensor], step: int, update: int, opt: torch.optim.Optimizer,
                  scaler) -> dict[str, float]:
        """Hinge loss on DiffAug'd real images vs 8-bit fakes of the updated decoder (eval mode: no noise)."""
        from rae_cli.gan_losses import hinge_d_loss, quantize_fake

        self.rae.eval()
        self.disc.train()
        out: dict[str, float] = {}
        accum = len(images)
        for m, x in enumerate(images):
            with torch.no_grad(), self.autocast:
                recon = self.rae(x)  # the bare module: no gradient, nothing to synchronise
            fake = quantize_fake(recon.float() * 2 - 1)
            fake = self.diffaug(fake, self._gen(step, _AUG_FAKE, update, m))
            real = self.diffaug(x * 2 - 1, self._gen(step, _AUG_REAL, update, m))
            with self._no_sync(self.disc_model, last=m == accum - 1):
                with self.autocast:
                    # One forward for both halves: the heads' norm is per sample, so this equals two calls, and
                    # DDP sees exactly one forward per backward.
                    logits = self.disc_model(torch.cat([fake, real]))
                logits_fake, logits_real = logits.float().chunk(2)
                d_loss = hinge_d_loss(logits_real, logits_fake)
                scaler.scale(d_loss / accum).backward()
            _accumulate(out, accum, d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        self.rae.train()
        return out


def _accumulate(out: dict[str, float], accum: int, **values: torch.Tensor) -> None:
    for k, v in values.items():
        out[k] = out.get(k, 0.0) + float(v.detach()) / accum


def _reduce_log(sums: dict[str, float], count: int, dist) -> dict[str, float]:
    """Averages over the logged steps and over all processes (official: rank 0 only)."""
    from rae_cli.distributed import all_reduce_mean

    keys = sorted(sums)
    if not keys:
        return {}
    t = torch.tensor([sums[k] / count for k in keys], dtype=torch.float64, device=dist.device)
    t = all_reduce_mean(t, dist)
    return dict(zip(keys, t.tolist()))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(rae_eval, images: torch.Tensor, grid_path: Path | None = None, batch_size: int = 16) -> dict[str, float]:
    """PSNR/SSIM of ``rae_eval``'s reconstructions of ``images`` (B, 3, S, S) in [0, 1]; saves an input/recon grid.

    ``rae_eval`` is an RAE in eval mode (no latent noise; the official eval of the live model ran in train mode,
    spec §10.1 #7). Reconstructions are clamped and quantised to 8 bits before scoring, like saved images.
    """
    from rae_cli.data import make_grid, save_image
    from rae_cli.metrics import psnr, ssim

    device = rae_eval.image_mean.device
    recon = torch.cat([rae_eval(images[i:i + batch_size].to(device)).float().clamp(0, 1).cpu()
                       for i in range(0, len(images), batch_size)])
    recon = recon.mul(255).round().div(255)
    result = {"psnr": psnr(recon, images).mean().item(), "ssim": ssim(recon, images).mean().item()}
    if grid_path is not None:
        n = min(8, len(images))
        save_image(make_grid(torch.cat([images[:n], recon[:n]]), nrow=n), _mkparent(grid_path))
    return result


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, metrics file, export


def _save_checkpoint(cfg, root: Path, step: int, plan: Plan, dist, *, decoder, ema, disc, opt_g, opt_d,
                     scaler_g, scaler_d) -> None:
    from rae_cli import distributed, run_dir

    if dist.is_main:
        run_dir.save_checkpoint(
            root, step,
            weights={"decoder": decoder.state_dict(), "ema": ema.state_dict(),
                     **({"disc": disc.state_dict()} if disc is not None else {})},
            resume_state={"step": step, "opt_g": opt_g.state_dict(), "scaler_g": scaler_g.state_dict(),
                          "scaler_d": scaler_d.state_dict(),
                          **({"opt_d": opt_d.state_dict()} if opt_d is not None else {})},
            config=cfg,
            meta={"kind": RUN_KIND, "num_train": plan.num_train, "steps_per_epoch": plan.steps_per_epoch,
                  "total_steps": plan.total_steps, "world_size": dist.world_size, "decoder_arch": decoder.arch(),
                  "encoder": "not saved: referenced by config.yaml (rae.encoder, rae.encoder_source)"})
        run_dir.apply_retention(root, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
    distributed.barrier(dist)


def _load_checkpoint(ckpt, plan: Plan, *, decoder, ema, disc, opt_g, opt_d, scaler_g, scaler_d) -> int:
    from rae_cli.checkpoint import CheckpointError, strict_load

    meta = ckpt.meta
    if meta.get("kind") != RUN_KIND:
        raise CheckpointError(f"{ckpt.path} is not a train-decoder checkpoint (kind {meta.get('kind')!r})")
    for key in ("num_train", "steps_per_epoch", "total_steps"):
        if meta.get(key) != getattr(plan, key):
            raise CheckpointError(f"{ckpt.path} was saved with {key}={meta.get(key)} but this run has "
                                  f"{getattr(plan, key)}: the image folder or batch settings changed since")
    strict_load(decoder, ckpt.weights("decoder"), f"{ckpt.path}/decoder.safetensors")
    ema.load_state_dict(ckpt.weights("ema"), f"{ckpt.path}/ema.safetensors")
    state = ckpt.resume_state()
    if disc is not None:
        strict_load(disc, ckpt.weights("disc"), f"{ckpt.path}/disc.safetensors")
        opt_d.load_state_dict(state["opt_d"])
    opt_g.load_state_dict(state["opt_g"])
    scaler_g.load_state_dict(state["scaler_g"])
    scaler_d.load_state_dict(state["scaler_d"])
    return int(state["step"])


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    from rae_cli.checkpoint import atomic_write_text

    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def export_trained_decoder(checkpoint: str | Path, out_dir: str | Path | None = None, *,
                           use_ema: bool = True) -> Path:
    """A train-decoder checkpoint (or run folder) → ``decoder.safetensors`` (ours), ``model.pt`` (official layout)
    and ``rae.yaml`` (an rae preset using them: ``rae recon --preset OUT/rae.yaml``). Returns the export folder.

    Default ``out_dir``: ``<run>/export``. ``use_ema``: export the EMA weights (as the released decoders are).
    """
    from rae_cli import run_dir
    from rae_cli.checkpoint import atomic_write_text, strict_load
    from rae_cli.config import load_resolved, to_dict
    from rae_cli.decoder import ViTDecoder
    from rae_cli.official import export_decoder_official, save_decoder

    ckpt = run_dir.resolve_checkpoint(checkpoint)
    meta = ckpt.meta
    if meta.get("kind") != RUN_KIND:
        raise RaeError(f"{ckpt.path} is not a train-decoder checkpoint (kind {meta.get('kind')!r})")
    out = Path(out_dir) if out_dir is not None else ckpt.path.parent.parent / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_resolved(TrainDecoderConfig, ckpt.path / run_dir.CONFIG_FILE)
    which = "ema" if use_ema else "decoder"
    decoder = ViTDecoder(**meta["decoder_arch"])
    strict_load(decoder, ckpt.weights(which), f"{ckpt.path}/{which}.safetensors")
    weights = out / "decoder.safetensors"
    save_decoder(decoder, weights, {"source": str(ckpt.path), "step": ckpt.step, "weights": which})
    export_decoder_official(decoder, out / "model.pt")
    rae_cfg = dataclasses.replace(cfg.rae, decoder_weights=str(weights.resolve()), noise_tau=0.0)
    from omegaconf import OmegaConf

    header = (f"# Trained decoder ({which}, step {ckpt.step}) from {ckpt.path.parent.parent.resolve()}: "
              f"`rae recon --preset {(out / 'rae.yaml').resolve()}`\n"
              "# noise_tau is 0 for inference; the encoder is referenced, not copied.\n")
    atomic_write_text(out / "rae.yaml", header + OmegaConf.to_yaml(OmegaConf.create(to_dict(rae_cfg))))
    log.info("exported the %s decoder of %s to %s", which, ckpt.path, out)
    return out
