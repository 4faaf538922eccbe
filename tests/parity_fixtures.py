"""The official-output fixture set: where it is, and small helpers to read it.

A plain module (not conftest.py) so tests can import it by name: ``tests/faults/conftest.py`` would otherwise
shadow ``from conftest import ...`` when the whole suite is collected.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARITY_DEFAULT = REPO / "tests" / "fixtures" / "parity"


def parity_dir() -> Path:
    """The official-output fixtures: ``$RAE_PARITY_DIR``, default ``tests/fixtures/parity`` (in the repository).

    Another set of the same format (other seeds and sizes) can be pointed at with ``RAE_PARITY_DIR``: every
    parity test reads its sizes, seeds and shapes from the fixture metadata.
    """
    env = os.environ.get("RAE_PARITY_DIR")
    return Path(env).expanduser() if env else PARITY_DEFAULT


def sub_state_dict(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix`` (e.g. ``"state_dict."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
