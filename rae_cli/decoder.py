"""The RAE pixel decoder: an MAE-style ViT decoder from latent tokens to image patches (paper §3, spec §1.5).

Key-compatible with the official ``GeneralDecoder`` (released ``model.pt`` files load strictly):
``decoder_embed`` → [zero-init trainable CLS; tokens] + frozen 2-D sin-cos pos-embed → pre-LN ViT
layers (exact GELU, LayerNorm eps 1e-12) → ``decoder_norm`` → ``decoder_pred`` (p·p·3 per token).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# name → (hidden_size, depth, num_heads, intermediate_size), the official configs/decoder/*/config.json.
DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "ViT-B": (768, 12, 12, 3072),
    "ViT-L": (1024, 24, 16, 4096),
    "ViT-XL": (1152, 28, 16, 4096),  # MLP ratio ≈ 3.56, not 4: copied from the official config
}

ATTN_IMPLS = ("sdpa", "eager")


def sincos_pos_embed_2d(dim: int, grid_size: int, *, cls_token: bool = True) -> torch.Tensor:
    """MAE 2-D sin-cos position embedding, (grid², dim), with an all-zero first row for the CLS slot.

    For the token at row i, column j (index i·w + j) the first dim/2 channels embed the column j and the
    last dim/2 the row i; each half is [sin(pos·ω), cos(pos·ω)] with ω_k = 1/10000^(k/(dim/4)), k < dim/4.
    Computed in float64 like the numpy original, then cast to float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos pos-embed needs a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (g, g) each, row-major token order

    def embed_1d(p: torch.Tensor) -> torch.Tensor:  # (g²,) → (g², dim/2)
        angles = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # (g², dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class _Linear(nn.Module):
    """A Linear stored under ``.dense`` (the HF ViT-MAE key layout the released weights use)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class _QKV(nn.Module):
    """Three separate Q/K/V projections (keys ``query``, ``key``, ``value``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class Attention(nn.Module):
    """Multi-head self-attention, scale 1/sqrt(head_dim), no dropout; SDPA or an explicit softmax."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.attention = _QKV(dim)
        self.output = _Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) → (B, H, N, D/H)
            return t.view(B, N, H, D // H).transpose(1, 2)

        q, k, v = heads(self.attention.query(x)), heads(self.attention.key(x)), heads(self.attention.value(x))
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # the official computation, kept to check SDPA against
            scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # (B, H, N, N)
            out = scores.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.output(out)


class DecoderLayer(nn.Module):
    """Pre-LN ViT block: h += Attn(LN(h)); h += W2·GELU(W1·LN(h))."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, eps: float, attn_impl: str):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = Attention(dim, num_heads, attn_impl)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Linear(dim, intermediate_size)
        self.output = _Linear(intermediate_size, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output(F.gelu(self.intermediate(self.layernorm_after(h))))  # exact erf GELU


class ViTDecoder(nn.Module):
    """Latent tokens (B, N, latent_dim) → pixel-patch logits (B, N, p·p·C) (official ``GeneralDecoder``).

    ``num_patches`` fixes the pos-embed grid (√num_patches per side); latents with another token count
    are resized bilinearly to it first (``interpolate_latent``).
    """

    def __init__(self, latent_dim: int, hidden_size: int, depth: int, num_heads: int, intermediate_size: int,
                 patch_size: int, num_patches: int, layer_norm_eps: float = 1e-12, num_channels: int = 3,
                 *, attn_impl: str = "sdpa", grad_checkpointing: bool = False):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"num_patches must be a square number, got {num_patches}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.latent_dim, self.hidden_size, self.depth = latent_dim, hidden_size, depth
        self.num_heads, self.intermediate_size = num_heads, intermediate_size
        self.patch_size, self.num_patches, self.num_channels = patch_size, num_patches, num_channels
        self.layer_norm_eps = layer_norm_eps
        self.grad_checkpointing = grad_checkpointing

        self.decoder_embed = nn.Linear(latent_dim, hidden_size)
        # Frozen but stored in the state dict (the released files carry it); row 0 is the CLS slot.
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0), requires_grad=False)  # (1, N+1, D)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps, attn_impl) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * num_channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        # Linear / LayerNorm keep the PyTorch default init, as in the official decoder.

    # -- configuration ------------------------------------------------------------------------------

    @property
    def attn_impl(self) -> str:
        return self.decoder_layers[0].attention.attn_impl if self.depth else "sdpa"

    def set_attn_impl(self, attn_impl: str) -> None:
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        for layer in self.decoder_layers:
            layer.attention.attn_impl = attn_impl

    def arch(self) -> dict[str, Any]:
        """The constructor integers: enough to rebuild this decoder (saved as safetensors metadata)."""
        return dict(latent_dim=self.latent_dim, hidden_size=self.hidden_size, depth=self.depth,
                    num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                    patch_size=self.patch_size, num_patches=self.num_patches,
                    layer_norm_eps=self.layer_norm_eps, num_channels=self.num_channels)

    # -- forward ------------------------------------------------------------------------------------

    def interpolate_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """Resize a (B, n, C) latent grid bilinearly to (B, num_patches, C) when n ≠ num_patches."""
        B, n, C = tokens.shape
        if n == self.num_patches:
            return tokens
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"latent token count {n} is not a square grid")
        target = math.isqrt(self.num_patches)
        grid = tokens.transpose(1, 2).reshape(B, C, side, side)  # (B, C, h, w), row-major tokens
        grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)  # (B, num_patches, C)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, latent_dim) → logits (B, num_patches, p·p·C): CLS prepended, then dropped from the output."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.latent_dim:
            raise ValueError(f"expected latent tokens (B, N, {self.latent_dim}), got {tuple(tokens.shape)}")
        x = self.decoder_embed(self.interpolate_latent(tokens))  # (B, N, D)
        cls = self.trainable_cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, x], dim=1) + self.decoder_pos_embed  # (B, N+1, D)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.decoder_layers:
            if checkpointing:  # recompute each layer's activations in backward instead of storing them
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        logits = self.decoder_pred(self.decoder_norm(h))  # (B, N+1, p·p·C)
        return logits[:, 1:]

    def unpatchify(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) → images (B, C, h·p, w·p); each token's outputs are ordered (row, col, channel)."""
        B, N, _ = logits.shape
        p, c = self.patch_size, self.num_channels
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"token count {N} is not a square grid")
        x = logits.reshape(B, side, side, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, c, side * p, side * p)


# ---------------------------------------------------------------------------------------------------
# Builders


def decoder_from_size(name: str, *, latent_dim: int, patch_size: int, num_patches: int, **kwargs) -> ViTDecoder:
    """Build a registered size (``"ViT-B"``, ``"ViT-L"``, ``"ViT-XL"``) for a given latent and token grid."""
    if name not in DECODER_SIZES:
        raise KeyError(f"unknown decoder size {name!r}; known: {', '.join(DECODER_SIZES)}")
    hidden, depth, heads, mlp = DECODER_SIZES[name]
    return ViTDecoder(latent_dim, hidden, depth, heads, mlp, patch_size, num_patches, **kwargs)


def decoder_arch_from_hf_config(config: Mapping[str, Any], *, latent_dim: int | None = None,
                                patch_size: int | None = None, num_patches: int | None = None) -> dict[str, Any]:
    """ViTDecoder kwargs from an official ViTMAE-style decoder config.json dict (``decoder_hidden_size`` …).

    The official RAE overwrites ``hidden_size`` (:= encoder width, the latent dim) and ``patch_size``
    (:= decoder patch size); pass them here. ``num_patches`` defaults to (image_size / patch_size)².
    """
    cfg = dict(config)
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"only the exact GELU decoder is supported, config has hidden_act={cfg['hidden_act']!r}")
    if not cfg.get("qkv_bias", True):
        raise ValueError("the decoder config has qkv_bias=false; the RAE decoders use biased Q/K/V")
    latent_dim = latent_dim if latent_dim is not None else cfg.get("hidden_size")
    patch_size = patch_size if patch_size is not None else cfg.get("patch_size")
    if not isinstance(patch_size, int):
        raise ValueError(f"decoder config patch_size is {patch_size!r}: pass patch_size explicitly "
                         "(the official configs hold the placeholder 'SHOULD BE RELOADED')")
    if not isinstance(latent_dim, int):
        raise ValueError("decoder config has no integer hidden_size: pass latent_dim explicitly")
    if num_patches is None:
        image_size = cfg.get("image_size")
        if not isinstance(image_size, int) or image_size % patch_size:
            raise ValueError(f"cannot derive num_patches from image_size={image_size!r} and patch_size={patch_size}")
        num_patches = (image_size // patch_size) ** 2
    missing = [k for k in ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                           "decoder_intermediate_size") if k not in cfg]
    if missing:
        raise ValueError(f"decoder config lacks {', '.join(missing)}")
    return dict(latent_dim=latent_dim, hidden_size=cfg["decoder_hidden_size"],
                depth=cfg["decoder_num_hidden_layers"], num_heads=cfg["decoder_num_attention_heads"],
                intermediate_size=cfg["decoder_intermediate_size"], patch_size=patch_size,
                num_patches=num_patches, layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                num_channels=cfg.get("num_channels", 3))


def decoder_from_hf_config(config: Mapping[str, Any], *, latent_dim: int | None = None,
                           patch_size: int | None = None, num_patches: int | None = None,
                           **kwargs) -> ViTDecoder:
    """Build a ViTDecoder from an official decoder config.json dict (see ``decoder_arch_from_hf_config``)."""
    arch = decoder_arch_from_hf_config(config, latent_dim=latent_dim, patch_size=patch_size, num_patches=num_patches)
    return ViTDecoder(**arch, **kwargs)
