"""The settings of ``rae train-decoder`` (stage 1, paper §3, spec §2): data, optimisation, losses, discriminator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from rae_cli.config import ConfigError, doc
from rae_cli.schema import RAEConfig
from rae_cli.training.session import PRECISIONS


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
    tf32: bool = doc("Allow TF32 matmuls on NVIDIA GPUs.", True)
    compile: bool = doc("torch.compile the RAE and discriminator forward passes (the saved weights are the bare "
                        "modules').", False)
    parallel: str = doc("Under torchrun: ddp (each process holds the whole decoder) or fsdp (FSDP2: the decoder's "
                        "weights, gradients, AdamW state and EMA sharded per layer over the processes; the frozen "
                        "encoder is replicated and the discriminator heads stay DDP; same checkpoints). On one "
                        "process both are plain training.", "ddp")
    seed: int = doc("Seed of the data order, crops, latent noise and DiffAug (derived per rank and step).", 0)
    device: str = doc("auto, cpu or cuda (under torchrun: the local GPU).", "auto")
    dist_timeout: Optional[float] = doc("Under torchrun: minutes a collective waits for the other processes before "
                                        "the job fails (null = torch's default: NCCL 10, gloo 30).", None)
    log_every: int = doc("Log averaged losses every this many steps.", 100)
    ckpt_every: int = doc("Save a checkpoint every this many steps (and always at the end).", 2500)
    ckpt_every_minutes: Optional[float] = doc("Also save when this many minutes of wall time have passed since the "
                                              "last checkpoint (rank 0's clock decides for all processes); null = "
                                              "steps only.", None)
    keep_last: int = doc("Keep this many newest checkpoints.", 2)
    keep_every: Optional[int] = doc("Also keep checkpoints whose step is a multiple of this (null = none).", None)
    eval_every: int = doc("Reconstruct the held-out images with the EMA decoder (PSNR/SSIM, a grid) every this many "
                          "steps (and at the end); 0 = only at the end.", 2500)
    tensorboard: bool = doc("Also log to TensorBoard (OUT/tensorboard; needs the tensorboard package).", False)
    wandb: bool = doc("Also log to Weights & Biases (needs the wandb package and a login).", False)
    wandb_project: str = doc("W&B project name.", "rae")
    stop_after: Optional[int] = doc("Stop (after saving) once this step is reached, without changing the schedule "
                                    "(for time-limited jobs; re-run the command to continue). null = train to the end.",
                                    None)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        from rae_cli.training.fsdp import check_parallel

        check_parallel(self.parallel, "train.parallel")
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
        if self.ckpt_every_minutes is not None and self.ckpt_every_minutes <= 0:
            raise ConfigError("train.ckpt_every_minutes must be > 0 (or null)")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"train.stop_after={self.stop_after} trains nothing: give a step ≥ 1 (or null to train "
                              "to the end)")


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

