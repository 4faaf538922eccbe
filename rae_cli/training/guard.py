"""The NaN guard: a NaN/Inf loss, gradient or weight stops the run, and a non-finite state is never saved.

Two checks, both with the same answer on every rank:
- every step, before the optimizer steps: the (all-reduced) loss and gradient norm must be finite
  (:func:`check_step`), so an optimizer never applies a non-finite update;
- before every checkpoint: every parameter and buffer of the weights about to be saved (model, EMA, ...) must be
  finite (:func:`check_state`), so a blow-up that reached the weights through a finite-but-huge update is caught
  before it becomes "the last good checkpoint".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

from rae_cli.errors import RaeError


class NonFiniteError(RaeError, FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or weight; nothing after the last good checkpoint was saved."""


def check_step(loss: float, grad_norm: float) -> None:
    """Raise :class:`NonFiniteError` if the step's loss or gradient norm is NaN/Inf (before the optimizer steps)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"the loss is {loss} and the gradient norm {grad_norm}")


def nonfinite_tensors(state: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """``file:key`` of every floating tensor holding a NaN/Inf, over ``{"model": state_dict, "ema": ...}``."""
    bad = []
    for name, sd in state.items():
        for key, t in sd.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{name}:{key}")
    return bad


def check_state(state: Mapping[str, Mapping[str, torch.Tensor]], dist=None) -> None:
    """Raise :class:`NonFiniteError` naming the first bad tensors if any weight about to be saved is non-finite.

    Under DDP every rank checks its own copy and the verdict is all-reduced, so all ranks stop together (no rank
    is left waiting at the checkpoint barrier)."""
    bad = nonfinite_tensors(state)
    if dist is not None and dist.enabled:
        flag = torch.tensor([float(len(bad))], device=dist.device)
        torch.distributed.all_reduce(flag)
        if flag.item() > 0 and not bad:
            bad = ["(on another process)"]
    if bad:
        shown = ", ".join(bad[:4]) + (f", ... ({len(bad)} in all)" if len(bad) > 4 else "")
        raise NonFiniteError(f"the weights about to be saved are not finite ({shown})")


def stopped_message(err: Exception, *, step: int, ckroot: Path, last_good: int | None, advice: str) -> str:
    """The one-line explanation of a guard stop: where, why, what was kept, and what to do."""
    from rae_cli.run_dir import checkpoint_name

    where = (f"the last good checkpoint is {ckroot / checkpoint_name(last_good)} (step {last_good}); it is kept"
             if last_good is not None else "no checkpoint had been saved yet")
    return (f"training stopped at step {step}: {err}. Nothing from this step on was saved; {where}. {advice}, then "
            "re-run the same command to resume from the last checkpoint.")
