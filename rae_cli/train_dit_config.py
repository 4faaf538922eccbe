"""The settings of ``rae train-dit`` (stage 2, paper §4): the schema behind its presets and ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

from rae_cli.config import ConfigError, doc
from rae_cli.errors import DataError
from rae_cli.meanflow import MeanFlowConfig
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig


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
    cache_local_dir: Optional[str] = doc("Node-local scratch folder (e.g. $SLURM_TMPDIR/rae): each cache shard is "
                                         "copied there on first use and read from the copy; null = read the cache "
                                         "folder directly.", None)
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
    precision: str = doc("fp32 (official recommendation), bf16 (autocast) or fp16 (autocast + GradScaler).", "fp32")
    tf32: bool = doc("Allow TF32 matmuls on NVIDIA GPUs (official: on).", True)
    compile: bool = doc("torch.compile the model.", False)
    parallel: str = doc("Under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: weights, "
                        "gradients, AdamW state and EMA sharded over the processes, one transformer block "
                        "gathered at a time; same checkpoints). On one process both are plain training.", "ddp")
    num_workers: int = doc("Data-loading worker processes per process (0 = in the main process).", 4)
    device: str = doc("auto, cpu or cuda (under torchrun: the local GPU).", "auto")
    dist_timeout: Optional[float] = doc("Under torchrun: minutes a collective waits for the other processes before "
                                        "the job fails (null = torch's default: NCCL 10, gloo 30).", None)

    log_every: int = doc("Steps between metric lines (metrics.jsonl, console, TensorBoard/W&B).", 100)
    ckpt_every_epochs: float = doc("Epochs between checkpoints (official: 10).", 10)
    ckpt_every_steps: Optional[int] = doc("Steps between checkpoints; overrides ckpt_every_epochs when set.", None)
    ckpt_every_minutes: Optional[float] = doc("Also checkpoint when this many minutes of wall time have passed "
                                              "since the last checkpoint (rank 0's clock decides for all "
                                              "processes); null = steps/epochs only.", None)
    keep_last: int = doc("Retention: keep this many newest checkpoints.", 2)
    keep_every_epochs: Optional[float] = doc("Retention: also keep checkpoints at multiples of this many epochs "
                                             "(null = none).", 100)
    tensorboard: bool = doc("Also log to TensorBoard (OUT/tensorboard; needs the tensorboard package).", False)
    wandb: bool = doc("Also log to Weights & Biases (needs the wandb package and a login).", False)
    wandb_project: str = doc("W&B project name.", "rae")

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        if self.global_batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1:
            raise ConfigError("global_batch_size, grad_accum_steps and epochs must be ≥ 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("ema_decay must be in [0, 1]")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} trains nothing and writes no checkpoint: give max_steps ≥ 1 "
                              "(or null to train all epochs)")
        if self.log_every < 1 or self.keep_last < 1:
            raise ConfigError("log_every and keep_last must be ≥ 1")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ConfigError("ckpt_every_steps must be ≥ 1")
        if self.ckpt_every_minutes is not None and self.ckpt_every_minutes <= 0:
            raise ConfigError("ckpt_every_minutes must be > 0 (or null)")
        if self.cache and self.images:
            raise ConfigError("give either a latent cache (--cache / cache=) or an image folder (--data / images=), "
                              "not both")
        if self.latent_shape is not None and len(self.latent_shape) != 3:
            raise ConfigError("latent_shape must be [C, h, w]")
        from rae_cli.training.fsdp import check_parallel

        check_parallel(self.parallel)
        if self.parallel == "fsdp" and self.objective == "meanflow":
            raise ConfigError("objective=meanflow is not supported with parallel=fsdp (its forward-mode derivative "
                              "does not run through FSDP's hooks): use parallel=ddp")
        if self.objective not in ("flow", "meanflow"):
            raise ConfigError(f"objective must be flow or meanflow, not {self.objective!r}")
        if self.objective == "meanflow" and getattr(self.dit, "second_time", "none") == "none":
            raise ConfigError("objective=meanflow needs a model with a second time input: dit.second_time=interval")


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
