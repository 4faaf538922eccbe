"""The shared parts of the two stage-2 transformers (:mod:`rae_cli.dit`): the adaLN block and final layer, the
``_DiTBase`` helpers (pos-embed, block execution, zero-init, MeanFlow's second time), and small guidance helpers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rae_cli.dit_layers import (Attention, GaussianFourierEmbedding, RotaryEmbedding2D, make_mlp, make_norm, modulate,
                                sincos_pos_embed_2d)


# --------------------------------------------------------------------------------------------------------------
# Blocks


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (LightningDiT / DDT block).

    The condition is (B, D) — one vector per sample, broadcast over tokens — or (B, N, D) per token (DDT head).
    adaLN = SiLU → Linear(D → 6D) chunked as (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
    with ``wo_shift`` it is 4D and the shifts are dropped.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False):
        super().__init__()
        self.norm1 = make_norm(dim, use_rmsnorm)
        self.attn = Attention(dim, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        self.norm2 = make_norm(dim, use_rmsnorm)
        self.mlp = make_mlp(dim, mlp_ratio, use_swiglu)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        if c.dim() == 2:
            c = c[:, None]  # (B, 1, D): broadcast over tokens, never materialised per token
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """norm → adaLN (shift, scale) → Linear(D → p²·C_out). ``final_norm=False`` drops the norm (probe option)."""

    def __init__(self, dim: int, out_per_token: int, use_rmsnorm: bool = True, final_norm: bool = True):
        super().__init__()
        self.norm_final = make_norm(dim, use_rmsnorm) if final_norm else nn.Identity()
        self.linear = nn.Linear(dim, out_per_token)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() == 2:
            c = c[:, None]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# Shared pieces of the two models


class _DiTBase(nn.Module):
    """Helpers shared by LightningDiT and DiT^DH: pos-embed setup, block execution, zero-init, checkpointing."""

    grad_checkpointing: bool = False  # activation checkpointing per block, training only

    def _make_pos_embed(self, grid_size: int, dim: int, learn: bool) -> None:
        # Frozen sin-cos by default (in the state dict, like the official code); trainable for the width probe.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size**2, dim), requires_grad=learn)

    def _init_pos_embed(self) -> None:
        if getattr(self, "pos_embed", None) is not None:
            n, dim = self.pos_embed.shape[1:]
            side = int(round(n**0.5))
            self.pos_embed.data.copy_(sincos_pos_embed_2d(dim, side).unsqueeze(0))

    def _run_block(self, block: DiTBlock, x: torch.Tensor, c: torch.Tensor,
                   rope: RotaryEmbedding2D | None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, use_reentrant=False)
        return block(x, c, rope)

    def _zero_adaln_and_output(self) -> None:
        """adaLN-Zero: every block's modulation and the final layer start at zero, so the model outputs 0."""
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _init_embedders(self) -> None:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    second_time: str = "none"

    def _add_second_time(self, second_time: str, dim: int) -> None:
        """MeanFlow's second time input, made after every other layer (so the rest of the init is unchanged):
        N(0, 0.02) first layer like t_embedder, zero output layer, so that it adds nothing until trained."""
        if second_time not in SECOND_TIME:
            raise ValueError(f"second_time must be one of {', '.join(SECOND_TIME)}, got {second_time!r}")
        self.second_time = second_time
        if second_time == "none":
            return
        self.r_embedder = GaussianFourierEmbedding(dim)
        nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.r_embedder.mlp[0].bias)
        nn.init.zeros_(self.r_embedder.mlp[2].weight)
        nn.init.zeros_(self.r_embedder.mlp[2].bias)

    def _time_embedding(self, t: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """t_emb, plus the embedding of t − r (or r) for a MeanFlow model; r = None means r = t."""
        t_emb = self.t_embedder(t)
        if self.second_time == "none":
            if r is not None:
                raise ValueError("this model has no second time input (dit.second_time: none); it cannot take r")
            return t_emb
        if r is None:
            r = t
        return t_emb + self.r_embedder(t - r if self.second_time == "interval" else r)


SECOND_TIME = ("none", "interval", "r")


def _as_pair(value, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or [body, head], got {value!r}")
        return list(value)
    return [value, value]


def _interval_list(cfg_interval) -> list[tuple[float, float]]:
    """LightningDiT intervals: a list of (lo, hi) pairs, or a single pair; empty = no interval."""
    if cfg_interval is None:
        return []
    items = list(cfg_interval)
    if len(items) == 2 and all(isinstance(v, (int, float)) for v in items):
        return [(float(items[0]), float(items[1]))]
    return [(float(lo), float(hi)) for lo, hi in items]


def _in_any_interval(t: torch.Tensor, intervals: list[tuple[float, float]]) -> torch.Tensor:
    """Per-sample mask: lo ≤ t < hi for some interval (the LightningDiT convention, half-open)."""
    inside = torch.zeros_like(t, dtype=torch.bool)
    for lo, hi in intervals:
        inside |= (t >= lo) & (t < hi)
    return inside


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))
