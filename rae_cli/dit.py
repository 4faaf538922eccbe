"""Stage-2 diffusion transformers: LightningDiT and DiT^DH (DiT with a wide, shallow DDT head), spec §3.

Both models take the noisy latent x (B, C, H, W), the flow time t (B,) in [0, 1] (t = 1 is noise) and class labels
y (B,) and return the velocity (B, C, H, W). Parameter names match the official checkpoints (``LightningDiT`` and
``DiTwDDTHead``), so official state dicts load strictly.

MeanFlow (``second_time="interval"`` or ``"r"``): the model also takes the start time r of an interval [r, t] and
returns the *average* velocity over it; the second time (t − r, or r) is embedded like t by ``r_embedder`` (the
MF-RAE key name) and added to the time embedding wherever t_emb is used. Without r (r = t) it is the
instantaneous velocity. ``r_embedder``'s output layer starts at zero, so a flow-matching state dict loaded into a
MeanFlow model (:func:`load_flow_into_meanflow`) gives exactly the flow model, for every (r, t). Also here: the paper-name registry, the width rule of
Theorem 1, and parameter counting.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rae_cli.dit_layers import (Attention, GaussianFourierEmbedding, LabelEmbedder, PatchEmbed, RotaryEmbedding2D,
                                make_mlp, make_norm, modulate, sincos_pos_embed_2d, unpatchify)
from rae_cli.guidance import interval_mask

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------------------
# LightningDiT


class LightningDiT(_DiTBase):
    """DiT with RMSNorm, SwiGLU, 2-D RoPE and a frozen sin-cos pos-embed (spec §3.2); condition c = t_emb + y_emb."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 768, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False,
                 use_pos_embed: bool = True, learn_pos_embed: bool = False, final_norm: bool = True,
                 second_time: str = "none"):
        super().__init__()
        if learn_pos_embed and not use_pos_embed:
            raise ValueError("learn_pos_embed=True needs use_pos_embed=True")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = GaussianFourierEmbedding(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        if use_pos_embed:
            self._make_pos_embed(grid, hidden_size, learn_pos_embed)
        else:
            self.pos_embed = None
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size**2 * self.out_channels, use_rmsnorm, final_norm)
        self.initialize_weights()
        self._add_second_time(second_time, hidden_size)

    def initialize_weights(self) -> None:
        """Official LightningDiT init: xavier on every Linear (zero bias), patch-embed like a Linear, N(0, 0.02)
        label table and t-MLP weights, sin-cos pos-embed, zero adaLN and output layer."""
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        self._init_pos_embed()
        self.x_embedder.init_like_linear()
        self._init_embedders()
        self._zero_adaln_and_output()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, r: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Velocity for noisy latents x (B, C, H, W) at times t (B,) with labels y (B,); with r (B,) (MeanFlow
        models only) the average velocity over [r, t]."""
        h = self.x_embedder(x)  # (B, N, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self._time_embedding(t, r) + self.y_embedder(y, self.training, force_drop_ids, generator)  # (B, D)
        for block in self.blocks:
            h = self._run_block(block, h, c, self.feat_rope)
        h = self.final_layer(h, c)  # (B, N, p²·C_out)
        out = unpatchify(h, self.patch_size, self.out_channels)
        if self.learn_sigma:
            out = out[:, : self.in_channels]  # the velocity; the variance half is unused by flow matching
        return out

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval=(), interval_cfg: float = 0.0) -> torch.Tensor:
        """Official-signature CFG on a doubled batch [x; x] with labels [y; null] (the second half of x is ignored).

        Outside every interval (lo ≤ t < hi) the scale is ``cfg_scale``; inside one, ``interval_cfg`` if it is > 1,
        else the conditional output. ``cfg_interval`` is a list of pairs or one pair; the default (none) means plain
        CFG (the official default crashed). The official code tests only t[0]; here it is per sample, which is the
        same when all samples share one time. Returns the guided velocity duplicated for both halves.
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        inside = _per_sample(_in_any_interval(t[: len(half)], _interval_list(cfg_interval)), cond)
        outside_v = uncond + cfg_scale * (cond - uncond)
        inside_v = uncond + interval_cfg * (cond - uncond) if interval_cfg > 1.0 else cond
        guided = torch.where(inside, inside_v, outside_v)
        return torch.cat([guided, guided])

    def forward_with_autoguidance(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  additional_model_forward: Callable, cfg_interval=(),
                                  interval_cfg: float = 0.0) -> torch.Tensor:
        """Official-signature AutoGuidance on a doubled batch: runs both models on the first half only and returns
        the result duplicated. Interval semantics as in :meth:`forward_with_cfg`."""
        n = len(x) // 2
        x, t, y = x[:n], t[:n], y[:n]
        main = self(x, t, y)
        guide = additional_model_forward(x, t, y)[:, : self.in_channels]
        inside = _per_sample(_in_any_interval(t, _interval_list(cfg_interval)), main)
        outside_v = guide + cfg_scale * (main - guide)
        inside_v = guide + interval_cfg * (main - guide) if interval_cfg > 1.0 else main
        v = torch.where(inside, inside_v, outside_v)
        return torch.cat([v, v])


# --------------------------------------------------------------------------------------------------------------
# DiT^DH


class DiTDH(_DiTBase):
    """DiT^DH (official ``DiTwDDTHead``, spec §3.3): a DiT encoder plus the paper's wide, shallow
    diffusion head.

    Encoder: s = blocks_enc(s_embedder(x) + pos_embed) conditioned on c = SiLU(t_emb + y_emb).
    Bridge:  s = s_projector(SiLU(t_emb + s))  (per token, width D_enc → D_head).
    (MeanFlow: t_emb = t_embedder(t) + r_embedder(t − r) in both places, as MF-RAE's ``DiTwDDTHead_MF``.)
    Head:    h = blocks_head(x_embedder(x)) conditioned **per token** on s, no absolute pos-embed (RoPE only).
    Fixes over the official code: patch_size > 1 (embedders take ``in_channels``, unpatchify with the right
    channels) and ``use_rope=False`` both work. The encoder and head must share one patch size.
    """

    def __init__(self, input_size: int = 16, patch_size: int | Sequence[int] = 1, in_channels: int = 768,
                 hidden_size: Sequence[int] = (1152, 2048), depth: Sequence[int] = (28, 2),
                 num_heads: int | Sequence[int] = (16, 16), mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, use_qknorm: bool = False, use_swiglu: bool = True, use_rope: bool = True,
                 use_rmsnorm: bool = True, wo_shift: bool = False, use_pos_embed: bool = True,
                 learn_pos_embed: bool = False, final_norm: bool = True, second_time: str = "none"):
        super().__init__()
        p_s, p_x = _as_pair(patch_size, "patch_size")
        if p_s != p_x:
            raise ValueError(f"encoder and head patch sizes must be equal, got {p_s} and {p_x}")
        if learn_pos_embed and not use_pos_embed:
            raise ValueError("learn_pos_embed=True needs use_pos_embed=True")
        d_enc, d_head = _as_pair(hidden_size, "hidden_size")
        l_enc, l_head = _as_pair(depth, "depth")
        h_enc, h_head = _as_pair(num_heads, "num_heads")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = p_x
        self.num_classes = num_classes
        self.encoder_hidden_size, self.decoder_hidden_size = d_enc, d_head
        self.num_encoder_blocks = l_enc

        self.s_embedder = PatchEmbed(input_size, p_s, in_channels, d_enc)
        self.x_embedder = PatchEmbed(input_size, p_x, in_channels, d_head)
        self.s_projector = nn.Linear(d_enc, d_head) if d_enc != d_head else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(d_enc)
        self.y_embedder = LabelEmbedder(num_classes, d_enc, class_dropout_prob)
        grid = self.s_embedder.grid_size
        if use_pos_embed:
            self._make_pos_embed(grid, d_enc, learn_pos_embed)
        else:
            self.pos_embed = None
        if use_rope:
            self.enc_feat_rope = RotaryEmbedding2D(d_enc // h_enc, grid)
            self.dec_feat_rope = RotaryEmbedding2D(d_head // h_head, self.x_embedder.grid_size)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        block = lambda dim, heads: DiTBlock(dim, heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
        # One list, encoder blocks first, as in the official checkpoints (blocks.0 … blocks.{L_enc+L_head−1}).
        self.blocks = nn.ModuleList([block(d_enc, h_enc) for _ in range(l_enc)]
                                    + [block(d_head, h_head) for _ in range(l_head)])
        self.final_layer = FinalLayer(d_head, p_x**2 * in_channels, use_rmsnorm, final_norm)
        self.initialize_weights()
        self._add_second_time(second_time, d_enc)

    def initialize_weights(self) -> None:
        """Official DDT init: Linear layers keep PyTorch's default init (no global xavier); both patch-embeds like a
        Linear; N(0, 0.02) label table and t-MLP weights; sin-cos pos-embed; zero adaLN and output layer."""
        self.x_embedder.init_like_linear()
        self.s_embedder.init_like_linear()
        self._init_embedders()
        self._init_pos_embed()
        self._zero_adaln_and_output()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, r: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Velocity for noisy latents x (B, C, H, W) at times t (B,) with labels y (B,); with r (B,) (MeanFlow
        models only) the average velocity over [r, t]. The second time's embedding joins t_emb in both places."""
        t_emb = self._time_embedding(t, r)  # (B, D_enc)
        c = F.silu(t_emb + self.y_embedder(y, self.training, force_drop_ids, generator))  # (B, D_enc)

        s = self.s_embedder(x)  # (B, N, D_enc)
        if self.pos_embed is not None:
            s = s + self.pos_embed
        for block in self.blocks[: self.num_encoder_blocks]:
            s = self._run_block(block, s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(t_emb[:, None] + s))  # (B, N, D_head): per-token head condition

        h = self.x_embedder(x)  # (B, N, D_head): the same noisy latent, re-embedded wide
        for block in self.blocks[self.num_encoder_blocks:]:
            h = self._run_block(block, h, s, self.dec_feat_rope)
        h = self.final_layer(h, s)  # (B, N, p²·C)
        return unpatchify(h, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Official-signature CFG: duplicates the first half of x, runs labels y as given (the caller puts the null
        labels in the second half), guides where t_min ≤ t ≤ t_max (per sample, first-half t) and returns the
        result duplicated for both halves. :func:`rae_cli.guidance.cfg` does the same without wasted compute."""
        t_min, t_max = cfg_interval
        if not t_min < t_max:
            raise ValueError(f"cfg_interval must be (t_min, t_max) with t_min < t_max, got {cfg_interval}")
        half = x[: len(x) // 2]
        cond, uncond = self(torch.cat([half, half]), t, y).chunk(2)
        inside = _per_sample(interval_mask(t[: len(half)], t_min, t_max), cond)
        guided = torch.where(inside, uncond + cfg_scale * (cond - uncond), cond)
        return torch.cat([guided, guided])

    def forward_with_autoguidance(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  additional_model_forward: Callable,
                                  cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Official-signature AutoGuidance on the full batch: v_guide + s·(v_main − v_guide) where
        t_min ≤ t ≤ t_max, else v_main. :func:`rae_cli.guidance.autoguidance` skips unneeded guide passes."""
        t_min, t_max = cfg_interval
        if not t_min < t_max:
            raise ValueError(f"cfg_interval must be (t_min, t_max) with t_min < t_max, got {cfg_interval}")
        main = self(x, t, y)
        guide = additional_model_forward(x, t, y)[:, : self.in_channels]
        inside = _per_sample(interval_mask(t, t_min, t_max), main)
        return torch.where(inside, guide + cfg_scale * (main - guide), main)


# --------------------------------------------------------------------------------------------------------------
# Registry, width rule, parameter counts

# name → (class, hidden_size, depth, num_heads); the DiT-DH head is 2 blocks of width 2048 with 16 heads.
DIT_REGISTRY: dict[str, tuple[type[nn.Module], object, object, object]] = {
    "DiT-S": (LightningDiT, 384, 12, 6),
    "DiT-B": (LightningDiT, 768, 12, 12),
    "DiT-L": (LightningDiT, 1024, 24, 16),
    "DiT-XL": (LightningDiT, 1152, 28, 16),
    "DiT-DH-S": (DiTDH, [384, 2048], [12, 2], [6, 16]),
    "DiT-DH-B": (DiTDH, [768, 2048], [12, 2], [12, 16]),
    "DiT-DH-L": (DiTDH, [1024, 2048], [24, 2], [16, 16]),
    "DiT-DH-XL": (DiTDH, [1152, 2048], [28, 2], [16, 16]),
}


def check_width(width: int, latent_channels: int, allow_narrow: bool) -> None:
    """Theorem 1: a transformer of width d < n (n = dimension of one input token) cannot fit the data; for a single
    image the flow-matching loss is bounded below by (n − d)/n. Raise unless ``allow_narrow``; warn loudly if so."""
    if width >= latent_channels:
        return
    bound = (latent_channels - width) / latent_channels
    msg = (f"model width {width} < token dimension {latent_channels}: by Theorem 1 of the RAE paper the diffusion "
           f"loss cannot go below (n − d)/n = {bound:.3f} even on a single image, so training will fail to fit")
    log.warning("!" * 20 + " " + msg + " " + "!" * 20)
    if not allow_narrow:
        raise ValueError(msg + ". Use a wider model (or DiT-DH, whose head is wide), or pass allow_narrow=True "
                         "(config: dit.allow_narrow: true) to build it anyway.")


def build_dit(name: str, *, input_size: int, in_channels: int, num_classes: int, patch_size: int = 1,
              allow_narrow: bool = False, **overrides) -> nn.Module:
    """Build a registry model by its paper name (e.g. ``"DiT-DH-XL"``); ``overrides`` replace constructor kwargs.

    The width rule is checked against the width that reads the token and writes the output: the hidden size for
    DiT, the **head** width for DiT-DH (its encoder may be narrower, e.g. DiT-DH-S [384, 2048] on 768 channels — the
    wide head is the point of the design). The token dimension is in_channels·patch_size².
    """
    if name not in DIT_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DIT_REGISTRY)}")
    cls, hidden, depth, heads = DIT_REGISTRY[name]
    kwargs = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
                  hidden_size=hidden, depth=depth, num_heads=heads)
    kwargs.update(overrides)
    hidden = kwargs["hidden_size"]
    width = _as_pair(hidden, "hidden_size")[1] if cls is DiTDH else hidden
    if not isinstance(width, int):
        raise ValueError(f"{name} needs an integer hidden_size, got {hidden!r}")
    check_width(width, in_channels * patch_size**2, allow_narrow)
    return cls(**kwargs)


def load_flow_into_meanflow(model: nn.Module, state_dict: dict, what: str = "weights") -> list[str]:
    """Load a state dict into ``model``; a flow-matching state dict may lack the MeanFlow ``r_embedder.*`` keys.

    The rule: every key of the state dict must exist in the model with the same shape, and the only keys the model
    may have beyond it are ``r_embedder.*``, which keep their initial values — a zero output layer, so the loaded
    model computes exactly the flow model's velocity, whatever r is. Returns the keys left at their init.
    """
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith("r_embedder."))
    if unexpected or missing:
        raise ValueError(f"{what} do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    kept = sorted(set(own) - set(state_dict))
    model.load_state_dict(state_dict, strict=False)
    return kept


class ParamCount(NamedTuple):
    total: int
    trainable: int


def count_parameters(model: nn.Module) -> ParamCount:
    """Total parameters (including frozen pos-embed and ``t_embedder.W``; buffers excluded) and trainable ones."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCount(total, trainable)
