"""DINO discriminator for stage-1 GAN training (spec §2.5, after StyleGAN-T / VAR).

A frozen DINO v1 ViT-S/8 turns an image into 5 token maps; 5 small trainable Conv1d heads score every token.
Only the heads are parameters or state: their keys match the official ``disc`` checkpoint (``heads.*``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from rae_cli.checkpoint import strict_load, torch_load_weights
from rae_cli.weights import resolve_path

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Heads


class BatchNormLocal(nn.Module):
    """The official "BatchNormLocal" with virtual batch 1: each sample is normalised over its tokens, per channel.

    Computed in fp32 (the output stays fp32), biased variance, affine, no running statistics.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N) → (B, C, N) fp32
        x = x.float()
        mean = x.mean(dim=-1, keepdim=True)  # (B, C, 1)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None] + self.bias[None, :, None]


class Residual(nn.Module):
    """(f(x) + x) / √2; the wrapped block is ``fn`` (key ``1.fn.*``)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv1d:
    """Conv1d with circular "same" padding under classic spectral norm (1 power iteration, eps 1e-12).

    The classic ``torch.nn.utils.spectral_norm`` keeps the official key names weight_orig / weight_u / weight_v.
    """
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


def conv_block(channels: int, kernel_size: int, eps: float) -> nn.Sequential:
    """SpecConv1d → BatchNormLocal → LeakyReLU(0.2)."""
    return nn.Sequential(spectral_conv1d(channels, channels, kernel_size), BatchNormLocal(channels, eps),
                         nn.LeakyReLU(0.2, inplace=True))


def make_head(channels: int, kernel_size: int = 9, eps: float = 1e-6) -> nn.Sequential:
    """One head: block(k=1) → residual block(k=ks) → SpecConv1d(C→1, k=1); (B, C, N) → (B, 1, N)."""
    return nn.Sequential(conv_block(channels, 1, eps), Residual(conv_block(channels, kernel_size, eps)),
                         spectral_conv1d(channels, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Frozen backbone


def build_dino_vit(*, img_size: int = 224, patch_size: int = 8, embed_dim: int = 384, depth: int = 12,
                   num_heads: int = 6, mlp_ratio: float = 4.0, norm_eps: float = 1e-6) -> nn.Module:
    """A timm VisionTransformer laid out like DINO v1 (ViT-S/8 by default), randomly initialised.

    tanh-approximate GELU, LayerNorm eps 1e-6, qkv bias, no classifier; state-dict keys are the DINO ones
    (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``). Attention uses SDPA.
    """
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                             act_layer="gelu_tanh", norm_layer=partial(nn.LayerNorm, eps=norm_eps))


class FrozenDino(nn.Module):
    """The frozen feature extractor: resize → ImageNet normalisation → ViT → K+1 token maps (B, D, N)."""

    def __init__(self, vit: nn.Module, key_depths: Sequence[int]):
        super().__init__()
        self.vit = vit
        self.img_size = vit.patch_embed.img_size[0]
        self.key_depths = tuple(sorted(set(key_depths)))
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # [−1, 1] → ImageNet normalisation in one affine step: ((x+1)/2 − m)/s = (0.5/s)·x + (0.5 − m)/s.
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenDino":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = self.img_size
        # Bilinear, no antialias (the official random-window crop is disabled). Identity when already at size.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        vit = self.vit
        x = vit.patch_embed(x)  # (B, N, D), row-major patches
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed  # (B, 1+N, D)
        maps = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in self.key_depths:
                maps.append(x[:, 1:].transpose(1, 2))  # patch tokens (B, D, N)
        # The final block output (no final norm) comes first.
        return [x[:, 1:].transpose(1, 2)] + maps


def dino_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINO checkpoint prepared as the official loader does: the key third of every ``attn.qkv.bias`` zeroed.

    (A key bias adds the same q·b_k to every score of a query, which softmax ignores: outputs change only by
    float rounding. Kept to match the official numbers exactly.)
    """
    out = {}
    for key, value in raw.items():
        if key.endswith("attn.qkv.bias"):
            value = value.clone()
            c = value.numel() // 3
            value[c:2 * c] = 0  # [q | k | v]: zero k
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Discriminator


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT + trainable heads; ``forward(x)`` with x (B, 3, H, W) in [−1, 1] → logits (B, (K+1)·N).

    For the S_8 recipe N = 784 and K = 4 key depths, so logits are (B, 3920).

    The backbone is held in a one-element tuple (as the official code does), so it is not a registered
    submodule: it is absent from ``parameters()``, ``state_dict()`` and DDP's view, and optimizers see only the
    heads. ``_apply`` is extended so ``.to()/.cuda()/.float()/.half()`` still move and cast it.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 8, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, key_depths: Sequence[int] = (2, 5, 8, 11),
                 ks: int = 9, norm_eps: float = 1e-6):
        super().__init__()
        bad = [d for d in key_depths if d < 0]
        if bad:
            raise ValueError(f"key_depths must be block indices ≥ 0, got {list(key_depths)}")
        key_depths = tuple(sorted({int(d) for d in key_depths if d < depth}))  # as the official code: drop ≥ depth
        if ks % 2 != 1:
            raise ValueError(f"ks must be odd (circular 'same' padding), got {ks}")
        vit = build_dino_vit(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
        self._frozen = (FrozenDino(vit, key_depths),)
        self.key_depths = key_depths
        self.num_tokens = (img_size // patch_size) ** 2
        self.heads = nn.ModuleList(make_head(embed_dim, ks, norm_eps) for _ in range(len(key_depths) + 1))

    @property
    def backbone(self) -> FrozenDino:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):
        # Device moves and dtype casts reach the unregistered backbone too.
        self._frozen[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def load_backbone(self, state_dict: dict[str, torch.Tensor], what: str = "DINO backbone weights") -> None:
        """Strictly load a timm/DINO-style ViT state dict (key biases zeroed, see ``dino_state_dict``)."""
        strict_load(self.backbone.vit, dino_state_dict(state_dict), what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the discriminator expects images (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        maps = self.backbone(x)  # K+1 × (B, D, N)
        logits = [head(m).flatten(1) for head, m in zip(self.heads, maps)]  # K+1 × (B, N)
        return torch.cat(logits, dim=1)  # (B, (K+1)·N)


def resolve_dino_weights(weights: str | Path | None) -> Path:
    """The DINO ViT-S/8 file: ``weights`` if given, else the ``dino-vits8`` artifact (torch hub checkpoints
    ``dino_deitsmall8_pretrain.pth``, or ``$RAE_HOME/discs/dino_vit_small_patch8_224.pth`` as the official
    config names it). Never downloads; raises ``WeightsNotFoundError``."""
    return resolve_path("dino-vits8", weights, "DINO discriminator weights")


def build_dino_discriminator(weights: str | Path | None = None, *, random_init: bool = False,
                             **arch) -> DinoDiscriminator:
    """The stage-1 discriminator with its frozen DINO backbone loaded (ViT-S/8 unless ``arch`` says otherwise).

    ``weights``: a DINO ViT state dict file (timm key layout); default: the ``dino-vits8`` artifact.
    ``random_init``: TEST ONLY, a random backbone. ``arch``: DinoDiscriminator keyword arguments (sizes, ks, ...).
    Heads are freshly initialised (global RNG); load a trained ``disc`` state dict with ``load_state_dict``.
    """
    path = None if random_init else resolve_dino_weights(weights)
    disc = DinoDiscriminator(**arch)
    if random_init:
        log.warning("DINO discriminator built with a RANDOM backbone: a test double, not the real discriminator.")
    else:
        disc.load_backbone(torch_load_weights(path), f"DINO weights {path}")
        log.info("DINO discriminator backbone from %s", path)
    return disc
