"""Shared test fixtures: the parity directory and small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SELF = sys.modules[__name__]  # this module, while it is being imported as "conftest"


def pytest_collectstart(collector):
    # tests/faults/conftest.py is imported under the same name "conftest" (no packages, prepend import mode) and
    # replaces this one in sys.modules; the test modules of this folder import helpers with `from conftest import`:
    # make that name mean this file again while each of them is imported.
    if isinstance(collector, pytest.Module) and Path(str(collector.path)).parent == Path(__file__).parent:
        sys.modules["conftest"] = _SELF


def parity_dir() -> Path:
    """The official-output fixtures: ``$RAE_PARITY_DIR``, default ``../shared/parity`` (next to the repo)."""
    env = os.environ.get("RAE_PARITY_DIR")
    return Path(env) if env else (REPO.parent / "shared" / "parity")


@pytest.fixture(scope="session")
def parity():
    """Return a loader: ``parity("ditddh_small") -> (tensors: dict, metadata: dict with JSON decoded)``."""
    root = parity_dir()
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set RAE_PARITY_DIR)")

    def load(name: str):
        from rae_cli.checkpoint import load_safetensors

        return load_safetensors(root / f"{name}.safetensors")

    load.root = root
    return load


def sub_state_dict(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix`` (e.g. ``"state_dict."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
