"""The Representation Autoencoder: frozen encoder + trained ViT decoder + per-element latent stats
(paper §3, spec §1.1-1.4).

encode: x ∈ [0,1] (B,3,H,W) → bicubic resize (no antialias) → (x−mean)/std → tokens (B,N,C)
        → [+ σ·ε, σ = τ·U(0,1) per sample, training only] → (B,C,h,w) → (z−mean)/√(var+eps)
decode: the inverse path through the decoder, ending in ·std+mean (not clamped).

A command that only encodes (or only decodes) builds only that half (``rae_cli.build.build_rae(parts=...)``); the
other half is then ``None`` and the encoder's width, patch size and pixel constants come from an ``EncoderInfo``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rae_cli.decoder import ViTDecoder, decoder_from_size
from rae_cli.encoders import EncoderInfo, FrozenEncoder


class RAE(nn.Module):
    """Frozen ``encoder`` (kept in eval mode, no grads) + trainable ``decoder`` + optional latent stats.

    Either half may be ``None`` (an encode-only or decode-only autoencoder); without the encoder, ``encoder_info``
    must say its width, patch size and pixel constants; without the decoder, ``image_size`` says the side of the
    images it would decode to (the size the encoder is fed). ``latent_mean`` / ``latent_var`` have the latent shape
    [C, h, w]; they are non-persistent buffers (moved by ``.to()``, absent from the state dict, never part of the
    decoder's weights). Without them the latent is left un-normalized (identity), as the official code does when
    no stat file is given.
    """

    def __init__(self, encoder: FrozenEncoder | None, decoder: ViTDecoder | None, *, input_size: int,
                 noise_tau: float = 0.0, latent_mean: torch.Tensor | None = None,
                 latent_var: torch.Tensor | None = None, eps: float = 1e-5, encoder_info: EncoderInfo | None = None,
                 image_size: int | None = None):
        super().__init__()
        if encoder is None and decoder is None:
            raise ValueError("an autoencoder needs an encoder, a decoder or both")
        if encoder is not None:
            encoder_info = encoder.info()
        elif encoder_info is None:
            raise ValueError("an autoencoder without its encoder needs encoder_info (width, patch size, pixel "
                             "constants)")
        info = encoder_info
        if decoder is not None and decoder.latent_dim != info.hidden_size:
            raise ValueError(f"decoder latent_dim {decoder.latent_dim} != encoder hidden size {info.hidden_size}")
        if input_size % info.patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of the encoder patch size "
                             f"{info.patch_size}")
        if noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {noise_tau}")
        self.encoder = encoder
        self.decoder = decoder
        self.encoder_info = info
        if decoder is not None:
            image_size = decoder.patch_size * math.isqrt(decoder.num_patches)
        self._image_size = image_size
        self.input_size = input_size
        self.noise_tau = noise_tau
        self.eps = eps
        self.register_buffer("image_mean", torch.tensor(info.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(info.image_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("latent_mean", None, persistent=False)
        self.register_buffer("latent_var", None, persistent=False)
        self.set_latent_stats(latent_mean, latent_var)

    @classmethod
    def from_encoder(cls, encoder: FrozenEncoder, *, input_size: int, decoder_size: str = "ViT-XL",
                     decoder_patch_size: int = 16, **kwargs) -> RAE:
        """A fresh RAE for ``encoder`` with a registered decoder size; the decoder's token grid is the encoder's."""
        grid = input_size // encoder.patch_size
        decoder = decoder_from_size(decoder_size, latent_dim=encoder.hidden_size, patch_size=decoder_patch_size,
                                    num_patches=grid * grid)
        return cls(encoder, decoder, input_size=input_size, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latent for ``input_size`` inputs."""
        grid = self.input_size // self.encoder_info.patch_size
        return (self.encoder_info.hidden_size, grid, grid)

    @property
    def image_size(self) -> int:
        """Side of the decoded images: decoder patch × its token-grid side (256 for the paper's models)."""
        if self.decoder is not None:
            return self.decoder.patch_size * math.isqrt(self.decoder.num_patches)
        if self._image_size is None:
            raise RuntimeError("this autoencoder was built without its decoder and without image_size")
        return self._image_size

    def _require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise RuntimeError(f"this autoencoder was built without its {part} (build_rae parts=...); "
                               f"build it with the {part} to {'encode' if part == 'encoder' else 'decode'}")
        return module

    @property
    def has_stats(self) -> bool:
        """Whether latents are normalized with per-element statistics."""
        return self.latent_mean is not None

    def set_latent_stats(self, mean: torch.Tensor | None, var: torch.Tensor | None) -> None:
        """Install per-element stats of shape [C, h, w]; a missing mean is 0 and a missing var is 1
        (official semantics); both None removes them."""
        if mean is None and var is None:
            self.latent_mean = self.latent_var = None
            return
        ref = mean if mean is not None else var
        mean = torch.zeros_like(ref) if mean is None else mean
        var = torch.ones_like(ref) if var is None else var
        if mean.shape != var.shape or tuple(mean.shape) != self.latent_shape:
            raise ValueError(f"latent stats must both have the latent shape {self.latent_shape}, "
                             f"got mean {tuple(mean.shape)} and var {tuple(var.shape)}")
        device = self.image_mean.device
        self.latent_mean = mean.detach().to(device=device, dtype=torch.float32)
        self.latent_var = var.detach().to(device=device, dtype=torch.float32)

    def train(self, mode: bool = True) -> RAE:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: never in training mode
        return self

    # -- encode / decode ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0,1], (B,3,H,W) → latents (B,C,h,w); noise only when training with noise_tau > 0."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        size = self.input_size
        if x.shape[-2:] != (size, size):
            # Official: bicubic without antialias (256 → 224 for DINOv2): a faithfulness trap, keep it.
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = (x - self.image_mean) / self.image_std
        tokens = self._require("encoder")(x)  # (B, N, C), LN-standardized per token
        if self.training and self.noise_tau > 0:
            tokens = self._add_noise(tokens, generator)
        B, N, C = tokens.shape
        side = math.isqrt(N)
        z = tokens.transpose(1, 2).reshape(B, C, side, side)  # (B, C, h, w), tokens in row-major order
        if self.has_stats:
            z = (z - self.latent_mean) / torch.sqrt(self.latent_var + self.eps)
        return z

    def _add_noise(self, tokens: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z + σ·ε with σ = τ·U(0,1), one σ per sample (uniform, as in the official code); rand then randn."""
        device = generator.device if generator is not None else tokens.device
        B = tokens.shape[0]
        sigma = self.noise_tau * torch.rand(B, 1, 1, generator=generator, device=device)
        eps = torch.randn(tokens.shape, generator=generator, device=device)
        return tokens + (sigma * eps).to(tokens)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B,C,h,w) → images (B,3,h·p,w·p), nominally in [0,1] but not clamped."""
        decoder = self._require("decoder")
        if z.ndim != 4 or z.shape[1] != self.encoder_info.hidden_size:
            raise ValueError(f"expected latents (B, {self.encoder_info.hidden_size}, h, w), got {tuple(z.shape)}")
        if self.has_stats:
            z = z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean
        tokens = z.flatten(2).transpose(1, 2)  # (B, N, C)
        x = decoder.unpatchify(decoder(tokens))  # (B, 3, H, W) in encoder-normalized pixel space
        return x * self.image_std + self.image_mean

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, generator=generator))
