"""The two stage-2 models of :mod:`rae_cli.dit`: ``LightningDiT`` and ``DiTDH`` (DiT with a wide, shallow DDT
head); parameter names match the official checkpoints."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rae_cli.dit_base import (DiTBlock, FinalLayer, _as_pair, _DiTBase, _in_any_interval, _interval_list,
                              _per_sample)
from rae_cli.dit_layers import GaussianFourierEmbedding, LabelEmbedder, PatchEmbed, RotaryEmbedding2D, unpatchify
from rae_cli.guidance import interval_mask


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
