"""Building blocks of the stage-2 diffusion transformers (spec §3.1).

RMSNorm, EVA-style interleaved 2-D RoPE, SDPA attention, SwiGLU / GELU MLPs, the Gaussian-Fourier timestep
embedder, the label embedder with a null class, 2-D sin-cos position embeddings, the patch embedder and adaLN
``modulate``. Parameter and buffer names follow the official checkpoints so that they load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²) + eps)·weight, with the normalisation computed in fp32 (safe under bf16 autocast)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """The norm used in blocks and final layers: RMSNorm with a weight, or a LayerNorm without affine."""
    if use_rmsnorm:
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift. ``shift``/``scale`` are (B, 1, D) or (B, N, D) and broadcast over tokens."""
    x = x * (1 + scale)
    return x if shift is None else x + shift


# --------------------------------------------------------------------------------------------------------------
# Position encodings


class RotaryEmbedding2D(nn.Module):
    """EVA ``VisionRotaryEmbeddingFast``: 2-D RoPE over the whole head dim with *interleaved* pairs.

    For the token at (row i, col j) the angles are [i·f, j·f] where f = [f0, f0, f1, f1, ...] and
    f_k = theta^(−2k / (head_dim/2)): the first half of the head dim rotates by the row, the second by the column.
    ``freqs_cos`` / ``freqs_sin`` (S², head_dim) are persistent buffers because the official checkpoints hold them.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4 (two axes × pairs), got {head_dim}")
        half = head_dim // 2  # per-axis rotary dim (EVA's ``dim``)
        # All in fp32 and in the official order of operations, so the buffers equal the official ones bit for bit.
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
        pos = torch.arange(grid_size) / grid_size * grid_size  # (S,) fp32; "ft_seq_len == pt_seq_len"
        angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (S, half): [f0, f0, f1, f1, ...]
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        grid = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (S², head_dim)
        self.register_buffer("freqs_cos", grid.cos())
        self.register_buffer("freqs_sin", grid.sin())
        # (−1, +1, −1, +1, …): rotate_pairs(x)·sin = swap_pairs(x)·(sign·sin) exactly (a sign flip is exact), so the
        # rotation needs one copy of x (the swap) instead of two (negate, stack). Not in the state dict.
        self.register_buffer("pair_sign", self._pair_sign(head_dim, grid.device), persistent=False)

    @staticmethod
    def _pair_sign(head_dim: int, device) -> torch.Tensor:
        return torch.tensor([-1.0, 1.0], device=device).repeat(head_dim // 2)

    def materialize_buffers(self) -> None:
        """Recreate ``pair_sign`` (in no state dict) after a meta-device build was filled by loading."""
        self.pair_sign = self._pair_sign(self.freqs_sin.shape[-1], self.freqs_sin.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate q or k of shape (B, H, N, head_dim) (or q and k stacked in front); N must equal the grid's S².

        Bit for bit x·cos + rotate_pairs(x)·sin, the official formula.
        """
        return x * self.freqs_cos + swap_pairs(x) * (self.freqs_sin * self.pair_sign)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) → (−x1, x0, −x3, x2, ...): rotate each adjacent pair by 90°."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    x_even, x_odd = pairs.unbind(-1)
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) → (x1, x0, x3, x2, ...): :func:`rotate_pairs` without the sign."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE/DiT recipe), (grid², dim) fp32, tokens in row-major order.

    The first dim/2 channels encode the **column** index and the last dim/2 the **row** index (the official
    meshgrid puts w first); each half is [sin(pos·ω), cos(pos·ω)] with ω_k = 1/10000^(k/(dim/4)).
    Computed in float64 and rounded once, as the official numpy code does.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / quarter
    omega = 1.0 / 10000**omega  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # token i·S + j → i
    cols = coords.repeat(grid_size)  # token i·S + j → j

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None, :]  # (S², dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (S², dim/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (S², dim)


# --------------------------------------------------------------------------------------------------------------
# Token mixing and channel mixing


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` Linear (layout q | k | v, head-major), optional q/k norm, RoPE, SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # The fp32 rope buffers would promote bf16 q/k; SDPA needs one dtype. Without q/k norm, q and k are
            # rotated in one pass over qkv[:2].
            if self.q_norm is None:
                q, k = rope(qkv[:2]).to(v.dtype).unbind(0)
            else:
                q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd), scale 1/sqrt(hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SwiGLUFFN(nn.Module):
    """w3(silu(a) · b) with (a, b) = chunk(w12(x)): the fused SwiGLU of LightningDiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMLP(nn.Module):
    """fc2(GELU_tanh(fc1(x))): the plain DiT MLP (timm ``Mlp`` key names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(dim: int, mlp_ratio: float, use_swiglu: bool) -> nn.Module:
    """SwiGLU with hidden = int(2/3·int(D·ratio)) (same parameter count as a GELU MLP), or a GELU MLP."""
    hidden = int(dim * mlp_ratio)
    if use_swiglu:
        return SwiGLUFFN(dim, int(2 / 3 * hidden))
    return GeluMLP(dim, hidden)


# --------------------------------------------------------------------------------------------------------------
# Conditioning and input embedders


class GaussianFourierEmbedding(nn.Module):
    """Timestep embedding: mlp([sin(2π·t·W), cos(2π·t·W)]) with frozen random W ~ N(0, scale²) of size 256.

    ``W`` is a non-trainable nn.Parameter and lives in the state dict (it must be loaded, not re-drawn).
    t is the raw flow time in [0, 1] (no ×1000).
    """

    def __init__(self, hidden: int, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.normal(0.0, scale, (embedding_size,)), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W.detach()[None, :] * 2 * math.pi  # (B, 256)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index ``num_classes``) used for label dropout and CFG.

    The table has a null row only when ``dropout_prob > 0``, as in the official models.
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Embed ``labels`` (B,); in training (or with ``force_drop_ids``, 1 = drop) replace some by the null class.

        Random drops use ``generator`` (drawn on its device, or on the labels' device when None).
        """
        if force_drop_ids is not None:
            drop = force_drop_ids.to(labels.device) == 1
        elif train and self.dropout_prob > 0:
            device = generator.device if generator is not None else labels.device
            drop = (torch.rand(labels.shape[0], generator=generator, device=device) < self.dropout_prob)
            drop = drop.to(labels.device)
        else:
            drop = None
        if drop is not None:
            if self.dropout_prob <= 0:
                raise ValueError("this label embedder has no null class (class_dropout_prob = 0); cannot drop labels")
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) → (B, (H/p)·(W/p), D) by a p×p stride-p conv (``proj``), tokens in row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"expected latents of spatial size {self.input_size}×{self.input_size}, "
                             f"got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) → (B, N, D)

    def init_like_linear(self) -> None:
        """Xavier-uniform on the flattened conv weight and a zero bias (official: "like nn.Linear")."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h·w, p²·C) with per-token order (row-in-patch, col-in-patch, channel) → (B, C, h·p, w·p)."""
    B, N, _ = x.shape
    h = w = math.isqrt(N)
    if h * w != N:
        raise ValueError(f"{N} tokens do not form a square grid")
    p = patch_size
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)
