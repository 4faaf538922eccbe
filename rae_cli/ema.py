"""Exponential moving average of model weights (spec §6: decay 0.9995 in stage 2, 0.9978 in stage 1).

The EMA is a frozen copy of the model made from the model itself, so it starts in sync on every rank (the official
code forgot to re-sync after the DDP broadcast, spec §10.1 #5). Like the official update it averages *every*
parameter, frozen ones included (they never change, so their average is themselves); buffers are copied.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn


class EMA:
    """ema ← decay·ema + (1 − decay)·model, over all parameters; buffers follow the model."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step from ``model`` (the unwrapped module: no DDP/compile prefixes)."""
        decay = self.decay if decay is None else decay
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameter lists")
        # lerp(ema, p, 1 − decay) = ema + (1 − decay)·(p − ema) = decay·ema + (1 − decay)·p
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], what: str = "EMA weights") -> None:
        from rae_cli.checkpoint import strict_load

        strict_load(self.module, state_dict, what)
