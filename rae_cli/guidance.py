"""Guidance as wrappers that turn a class-conditional network into ``model_fn(x, t) -> v`` (spec §5).

- :func:`conditional`: v = v(x, t, y).
- :func:`cfg`: classifier-free guidance v = v_u + s·(v_c − v_u) for samples with t_min ≤ t ≤ t_max (inclusive,
  per sample), else v_c. The unconditional pass runs only for the samples inside the interval, in the same
  forward as the conditional one (one batch of B + k); this equals the official ``forward_with_cfg``.
- :func:`autoguidance`: v = v_guide + s·(v_main − v_guide) inside the interval, else v_main, with the guide run
  only on the samples that need it and never on a doubled batch (the official scripts waste half).

Networks are called as ``net(x, t, y)``; :class:`CountingModel` records every forward for tests and NFE reports.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CountingModel:
    """Wraps a network and records the batch size of every forward (``calls``, ``samples``); attributes such as
    ``num_classes`` are read through from the wrapped model."""

    def __init__(self, model: Network):
        self.model = model
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        return self.model(x, t, y, **kwargs)

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    @property
    def samples(self) -> int:
        """Total samples pushed through the network (the compute actually spent)."""
        return sum(self.batch_sizes)

    def reset(self) -> None:
        self.batch_sizes.clear()

    def __getattr__(self, name: str):
        if name == "model":  # not yet set (e.g. during copy); avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def interval_mask(t: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """Per-sample guidance switch: t_min ≤ t ≤ t_max (inclusive at both ends, as the official DiT^DH code)."""
    return (t >= t_min) & (t <= t_max)


def _check_interval(t_min: float, t_max: float) -> None:
    if t_min > t_max:
        raise ValueError(f"guidance interval must have t_min <= t_max, got [{t_min}, {t_max}]")


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} latents but {y.shape[0]} labels")


def conditional(model: Network, y: torch.Tensor) -> ModelFn:
    """Plain class-conditional velocity (no guidance)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x, y)
        return model(x, t, y)
    return model_fn


def cfg(model: Network, y: torch.Tensor, scale: float, t_min: float = 0.0, t_max: float = 1.0,
        null_label: int | None = None) -> ModelFn:
    """Classifier-free guidance inside [t_min, t_max]; ``null_label`` defaults to ``model.num_classes``.

    Scale 1 is the conditional model (no unconditional pass at all).
    """
    _check_interval(t_min, t_max)
    if scale == 1.0:
        return conditional(model, y)
    if null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("cfg needs null_label (the model has no num_classes attribute)")
    y_null = torch.full_like(y, int(null_label))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x, y)
        inside = interval_mask(t, t_min, t_max)
        if not bool(inside.any()):
            return model(x, t, y)  # outside the interval only the conditional velocity is needed
        if bool(inside.all()):
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
            return uncond + scale * (cond - uncond)
        idx = inside.nonzero().squeeze(1)  # (k,) samples that need the unconditional pass
        out = model(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([y, y_null[idx]]))
        cond, uncond = out[: x.shape[0]], out[x.shape[0]:]  # (B, …), (k, …)
        guided = cond.clone()
        guided[idx] = uncond + scale * (cond[idx] - uncond)
        return guided
    return model_fn


def autoguidance(model: Network, guide_model: Network, y: torch.Tensor, scale: float, t_min: float = 0.0,
                 t_max: float = 1.0) -> ModelFn:
    """AutoGuidance with a weaker guide of the same conditioning: one main pass of batch B per call, plus one guide
    pass on the samples inside [t_min, t_max] (batch B when all are inside, none when none are). Scale 1 = main."""
    _check_interval(t_min, t_max)
    if scale == 1.0:
        return conditional(model, y)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x, y)
        main = model(x, t, y)
        inside = interval_mask(t, t_min, t_max)
        if not bool(inside.any()):
            return main
        if bool(inside.all()):
            guide = guide_model(x, t, y)
            return guide + scale * (main - guide)
        idx = inside.nonzero().squeeze(1)
        guide = guide_model(x[idx], t[idx], y[idx])  # (k, …)
        guided = main.clone()
        guided[idx] = guide + scale * (main[idx] - guide)
        return guided
    return model_fn


GuidanceMethod = Literal["none", "cfg", "autoguidance"]


def guided_model_fn(model: Network, y: torch.Tensor, method: GuidanceMethod = "none", scale: float = 1.0,
                    t_min: float = 0.0, t_max: float = 1.0, guide_model: Network | None = None,
                    null_label: int | None = None) -> ModelFn:
    """One entry point for samplers: ``method`` none | cfg | autoguidance (which needs ``guide_model``)."""
    if method == "none":
        return conditional(model, y)
    if method == "cfg":
        return cfg(model, y, scale, t_min, t_max, null_label)
    if method == "autoguidance":
        if guide_model is None:
            raise ValueError("autoguidance needs a guide model (a smaller / less-trained DiT with the same labels)")
        return autoguidance(model, guide_model, y, scale, t_min, t_max)
    raise ValueError(f"unknown guidance method {method!r}; use none, cfg or autoguidance")
