"""Test-only fault injection: named points where the fault suite (``tests/faults/``) makes a real fault happen.

Nothing here runs unless the environment variable ``RAE_FAULT_INJECT`` is set (the fault suite sets it for one
subprocess; users never do). Its value is a comma-separated list of ``ACTION:POINT[@N]`` entries:

- ``kill:POINT[@N]`` — the process kills itself with SIGKILL when it reaches ``POINT`` (at its ``N``-th arrival,
  or at the arrival whose ``step`` argument is ``N`` when the caller passes a step; without ``@N``: the first);
- ``nan:POINT[@N]`` — :func:`nonfinite` answers True there, and the caller makes its value non-finite.

Entries fire only on the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so an elastic
restart runs clean, and, when ``RAE_FAULT_INJECT_RANK`` is set, only in the process whose ``RANK`` equals it.

Points used by the package (keep this list current; the fault suite names them):

| point | where |
|---|---|
| ``checkpoint-before-rename`` | ``run_dir.save_checkpoint``: every file of the checkpoint is written, the rename is next |
| ``train-step`` | a trainer, once optimizer step ``step`` (1-based) is done and before any checkpoint of it |
| ``loss`` | a trainer's loss of optimizer step ``step`` (1-based): ``nan:`` makes it NaN before the finiteness check |
| ``weights`` | a trainer, after optimizer step ``step`` (1-based): ``nan:`` makes a weight NaN (a blow-up the loss did not show), to be caught before the next checkpoint |
| ``cache-shard`` | ``cache-latents``, after shard ``step`` (0-based) is written |
| ``sample-image`` | ``rae sample``, after image ``step`` (0-based) is written |
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RAE_FAULT_INJECT"
_arrivals: Counter = Counter()


def _entries(action: str):
    spec = os.environ.get(ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        act, _, rest = item.partition(":")
        if act != action:
            continue
        name, _, n = rest.partition("@")
        yield name, (int(n) if n else None)


def _hit(action: str, name: str, step: int | None) -> bool:
    if ENV not in os.environ or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    only = os.environ.get("RAE_FAULT_INJECT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return False
    _arrivals[(action, name)] += 1
    for point, n in _entries(action):
        if point != name:
            continue
        if n is None or (step is not None and step == n) or (step is None and _arrivals[(action, name)] == n):
            return True
    return False


def point(name: str, step: int | None = None) -> None:
    """A place where ``kill:`` entries take effect (SIGKILL: no cleanup, no ``finally``, as a power cut or OOM)."""
    if _hit("kill", name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def nonfinite(name: str, step: int | None = None) -> bool:
    """True where a ``nan:`` entry asks for a non-finite value at this point."""
    return _hit("nan", name, step)
