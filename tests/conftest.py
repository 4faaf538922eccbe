"""Shared test fixtures: the parity directory and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


PARITY_DEFAULT = REPO / "tests" / "fixtures" / "parity"


def parity_dir() -> Path:
    """The official-output fixtures: ``$RAE_PARITY_DIR``, default ``tests/fixtures/parity`` (in the repository).

    Another set of the same format (other seeds and sizes) can be pointed at with ``RAE_PARITY_DIR``: every
    parity test reads its sizes, seeds and shapes from the fixture metadata.
    """
    env = os.environ.get("RAE_PARITY_DIR")
    return Path(env).expanduser() if env else PARITY_DEFAULT


@pytest.fixture(scope="session")
def parity():
    """Return a loader: ``parity("ditddh_small") -> (tensors: dict, metadata: dict with JSON decoded)``."""
    root = parity_dir()
    if not root.is_dir():  # an error, never a skip: a suite without its reference outputs proves nothing
        raise FileNotFoundError(f"parity fixtures not found at {root}: restore tests/fixtures/parity from git, "
                                "or point RAE_PARITY_DIR at a fixture set of the same format")

    def load(name: str):
        from rae_cli.checkpoint import load_safetensors

        return load_safetensors(root / f"{name}.safetensors")

    load.root = root
    return load


def sub_state_dict(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix`` (e.g. ``"state_dict."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
