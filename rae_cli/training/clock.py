"""When a trainer saves: every N steps (or epochs), every M minutes of wall time, and always at the last step.

Under DDP the time-based decision is taken by rank 0 and broadcast, so every rank saves at the same step and no
rank waits alone at the checkpoint barrier (clocks of different processes disagree).
"""

from __future__ import annotations

import time

import torch


class CheckpointClock:
    """``due(step, last)`` → save now? ``every_steps``: step interval (None = none); ``every_minutes``: wall-time
    interval since the last save or the start (None = none)."""

    def __init__(self, every_steps: int | None, every_minutes: float | None, dist=None):
        self.every_steps, self.every_minutes, self.dist = every_steps, every_minutes, dist
        self.since = time.monotonic()

    def _minutes_elapsed(self) -> bool:
        flag = (time.monotonic() - self.since) >= 60.0 * self.every_minutes
        if self.dist is not None and self.dist.enabled:
            t = torch.tensor([1.0 if flag else 0.0], device=self.dist.device)
            torch.distributed.broadcast(t, src=0)  # rank 0's clock decides for everyone
            flag = bool(t.item() > 0)
        return flag

    def due(self, step: int, last: bool = False) -> bool:
        by_time = self.every_minutes is not None and self._minutes_elapsed()  # every rank takes part every step
        due = last or by_time or bool(self.every_steps and step % self.every_steps == 0)
        if due:
            self.since = time.monotonic()
        return due
