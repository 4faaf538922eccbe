"""Learning-rate schedules as pure functions of the optimizer step (spec §6).

``linear`` is the official stage-2 schedule: the LR holds at ``base_lr`` for the warmup (or ramps from 0 when
``warmup_from_zero``), then decays linearly to ``final_lr`` at ``decay_end`` and stays there. ``cosine`` warms up the
same way, then follows a half cosine from ``base_lr`` to ``final_lr`` at ``total``. Being stateless, a resumed run
needs only the step number.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, kind: str, base_lr: float, final_lr: float = 0.0, warmup: int = 0,
          warmup_from_zero: bool = False, decay_end: int | None = None, total: int | None = None) -> float:
    """The LR used for optimizer step ``step`` (0-based: the first update uses ``lr_at(0)``).

    ``warmup``, ``decay_end`` and ``total`` are in optimizer steps (callers convert epochs with steps per epoch).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        # The official "warmup" with warmup_from_zero=false does not ramp: it is a constant phase.
        return base_lr * (step + 1) / warmup if warmup_from_zero else base_lr
    if kind == "constant":
        return base_lr
    if kind == "linear":
        end = decay_end if decay_end is not None else total
        if end is None or end <= warmup:
            return base_lr if end is None else final_lr
        frac = min(1.0, (step - warmup) / (end - warmup))
        return base_lr + (final_lr - base_lr) * frac
    # cosine
    if total is None or total <= warmup:
        return base_lr if total is None else final_lr
    frac = min(1.0, (step - warmup) / (total - warmup))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * frac))
