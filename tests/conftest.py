"""Shared test fixtures: the parity directory and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
        from safetensors import safe_open

        path = root / f"{name}.safetensors"
        tensors = {}
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        for k, v in list(meta.items()):
            try:
                meta[k] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                pass
        return tensors, meta

    load.root = root
    return load


def sub_state_dict(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix`` (e.g. ``"state_dict."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
