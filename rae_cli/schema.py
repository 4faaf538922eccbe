"""Config sections shared by several commands (the stage-1 autoencoder, the encode/recon jobs).

Each field's help text is its documentation; presets (``presets/<kind>/*.yaml``) fill what differs from the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

from rae_cli.config import ConfigError, doc


@dataclass
class RAEConfig:
    """The Representation Autoencoder: frozen encoder + ViT decoder + per-element latent statistics (spec §1)."""

    preset_kind: ClassVar[str] = "rae"

    encoder: str = doc("Encoder registry name: dinov2-b, dinov2-s, dinov2-l, dinov2-b-noreg, siglip2-b, mae-b, "
                       "efficientnet-lite0.", "dinov2-b")
    encoder_source: Optional[str] = doc("Hugging Face id or local directory of the encoder weights; null = the "
                                        "registry's official id. 'presets:<path>' is relative to the presets folder.",
                                        None)
    encoder_random_init: bool = doc("TEST ONLY: build the encoder from its config with random weights (never a "
                                    "pretrained model; every output says so).", False)
    encoder_input_size: Optional[int] = doc("Images are resized (bicubic, no antialias) to this size before the "
                                            "encoder; null = the registry encoder's own input size (224 for "
                                            "DINOv2, 256 for SigLIP2 and MAE).", None)
    encoder_options: Dict[str, Any] = doc("Extra encoder arguments (e.g. {stride: 8} for efficientnet-lite0).",
                                          factory=dict)
    decoder: str = doc("Decoder size (ViT-B, ViT-L, ViT-XL), 'custom' (use the decoder_* sizes below), or a path to "
                       "an official ViTMAE-style decoder config.json.", "ViT-XL")
    decoder_hidden_size: Optional[int] = doc("Decoder width for decoder=custom.", None)
    decoder_depth: Optional[int] = doc("Decoder depth for decoder=custom.", None)
    decoder_heads: Optional[int] = doc("Decoder attention heads for decoder=custom.", None)
    decoder_intermediate_size: Optional[int] = doc("Decoder MLP width for decoder=custom.", None)
    decoder_patch_size: int = doc("Pixels per latent token side in the output (16 → 256² from 16×16 tokens; 32 "
                                  "turns 256-latents into 512² images).", 16)
    decoder_weights: Optional[str] = doc("Decoder weights: our .safetensors, an official model.pt, or a released "
                                         "artifact name (see `rae download --list`); null = random init (training).",
                                         None)
    stats: Optional[str] = doc("Latent statistics: our .safetensors (from cache-latents), an official stat.pt, or a "
                               "released artifact name; null = no normalisation.", None)
    noise_tau: float = doc("Noise augmentation τ: σ = τ·U(0,1) per sample, added to encoder tokens in training.", 0.0)
    eps: float = doc("ε in (z − mean)/sqrt(var + ε).", 1e-5)
    seed: int = doc("Seed for random-init weights (tests, fresh decoders).", 0)
    source: Optional[str] = doc("A diffusers AutoencoderRAE: 'hf:<repo id>' or a local folder (config.json + "
                                "diffusion_pytorch_model.safetensors). It replaces the encoder, sizes, decoder "
                                "weights and statistics (whatever the preset said).", None)

    def validate(self) -> None:
        if self.source:
            from rae_cli import diffusers_rae

            for key, value in diffusers_rae.rae_fields(diffusers_rae.locate(self.source)).items():
                setattr(self, key, value)
        if self.encoder_input_size is None:
            from rae_cli.encoders import ENCODERS

            if self.encoder not in ENCODERS:
                raise ConfigError(f"rae.encoder={self.encoder!r} is a family, not a registry encoder: set "
                                  "rae.encoder_input_size")
            self.encoder_input_size = ENCODERS[self.encoder].input_size
        if self.decoder == "custom":
            missing = [k for k in ("decoder_hidden_size", "decoder_depth", "decoder_heads",
                                   "decoder_intermediate_size") if getattr(self, k) is None]
            if missing:
                raise ConfigError(f"rae.decoder=custom needs {', '.join('rae.' + m for m in missing)}")
        if self.noise_tau < 0:
            raise ConfigError("rae.noise_tau must be ≥ 0")


@dataclass
class EncodeConfig:
    """``rae encode``: images → latents (safetensors)."""

    preset_kind: ClassVar[str] = "encode"

    rae: RAEConfig = doc("The autoencoder (a string names an rae preset).", factory=RAEConfig)
    image_size: Optional[int] = doc("ADM center-crop size before encoding; null = the autoencoder's image size.", None)
    crop: str = doc("adm (center crop), resize (square resize) or none (encoder resizes).", "adm")
    batch_size: int = doc("Images per forward pass.", 16)
    dtype: str = doc("Latent dtype on disk: fp32, fp16 or bf16.", "fp32")
    device: str = doc("auto, cpu or cuda.", "auto")

    def validate(self) -> None:
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"dtype must be fp32, fp16 or bf16, not {self.dtype!r}")
        if self.crop not in ("adm", "resize", "none"):
            raise ConfigError(f"crop must be adm, resize or none, not {self.crop!r}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be ≥ 1")


@dataclass
class ReconConfig:
    """``rae recon``: images → reconstructions, a side-by-side grid, PSNR/SSIM (and rFID with a reference)."""

    preset_kind: ClassVar[str] = "recon"

    rae: RAEConfig = doc("The autoencoder (a string names an rae preset).", factory=RAEConfig)
    image_size: Optional[int] = doc("ADM center-crop size; null = the autoencoder's image size.", None)
    crop: str = doc("adm (center crop) or resize (square resize).", "adm")
    batch_size: int = doc("Images per forward pass.", 16)
    grid_images: int = doc("How many input/reconstruction pairs go into grid.png (spread evenly over the inputs).",
                           16)
    rfid: bool = doc("Also compute rFID (Inception features) of reconstructions vs inputs.", False)
    device: str = doc("auto, cpu or cuda.", "auto")

    def validate(self) -> None:
        if self.crop not in ("adm", "resize"):
            raise ConfigError(f"crop must be adm or resize, not {self.crop!r}")
        if self.batch_size < 1 or self.grid_images < 0:
            raise ConfigError("batch_size must be ≥ 1 and grid_images ≥ 0")


@dataclass
class DiTConfig:
    """A stage-2 diffusion transformer from the registry (spec §3), with optional size overrides."""

    preset_kind: ClassVar[str] = "dit"

    name: str = doc("Registry name: DiT-S/B/L/XL (LightningDiT) or DiT-DH-S/B/L/XL (DiT + wide shallow head).",
                    "DiT-DH-XL")
    hidden_size: Optional[Any] = doc("Override width: an int (DiT) or [body, head] (DiT-DH).", None)
    depth: Optional[Any] = doc("Override depth: an int (DiT) or [body, head] (DiT-DH).", None)
    num_heads: Optional[Any] = doc("Override heads: an int (DiT) or [body, head] (DiT-DH).", None)
    patch_size: int = doc("Latent patch size (1 in every paper config).", 1)
    mlp_ratio: float = doc("MLP expansion ratio.", 4.0)
    class_dropout_prob: float = doc("Label dropout for classifier-free guidance (paper: 0.1).", 0.1)
    learn_pos_embed: bool = doc("Trainable absolute position embedding (probe models; paper: frozen sin-cos).", False)
    final_norm: bool = doc("Norm before the final layer (paper: true).", True)
    allow_narrow: bool = doc("Build even if width < latent channels (Theorem 1: the loss cannot reach 0).", False)
    grad_checkpointing: bool = doc("Activation checkpointing per block (saves memory, ~30% slower).", False)
    second_time: str = doc("MeanFlow models: a second time input embedded like t and added to its embedding — "
                           "interval (t − r, MF-RAE / MeanFlow) or r; none = a flow-matching model (its weights "
                           "load into a MeanFlow model, whose new r_embedder starts with a zero output layer).",
                           "none")


@dataclass
class FlowConfig:
    """Flow matching (spec §4): linear path, t=0 data, t=1 noise, velocity target, shifted time."""

    preset_kind: ClassVar[str] = "flow"

    time_dist: str = doc("Training time distribution: uniform or logit-normal.", "logit-normal")
    logit_mu: float = doc("Logit-normal location μ.", 0.0)
    logit_sigma: float = doc("Logit-normal scale σ.", 1.0)
    t0: float = doc("Smallest training time.", 0.0)
    t1: float = doc("Largest training time (official: 1 − 1/1000).", 0.999)
    shift: Optional[float] = doc("Time shift s in s·t/(1+(s−1)·t); null = sqrt(C·h·w / shift_base) from the latent "
                                 "shape. Tiny, redundant latents need s ≥ 1 (see README).", None)
    shift_base: int = doc("Base dimension of the shift formula (paper: 4096).", 4096)

    def validate(self) -> None:
        if self.time_dist not in ("uniform", "logit-normal"):
            raise ConfigError(f"flow.time_dist must be uniform or logit-normal, not {self.time_dist!r}")
        if not 0.0 <= self.t0 < self.t1 <= 1.0:
            raise ConfigError("flow needs 0 ≤ t0 < t1 ≤ 1")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError("flow.shift must be > 0")

    def resolved_shift(self, latent_shape) -> float:
        """The shift actually used: the override, or sqrt(prod(latent_shape) / shift_base)."""
        import math

        if self.shift is not None:
            return float(self.shift)
        return math.sqrt(math.prod(int(d) for d in latent_shape) / self.shift_base)
