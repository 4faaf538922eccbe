"""Shared test fixtures: the parity directory and small helpers."""

from __future__ import annotations

import pytest

from parity_fixtures import REPO, parity_dir, sub_state_dict  # noqa: F401  (re-exported)


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


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run much faster on one thread (``usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def init_spy(monkeypatch):
    """Records, for every Linear/LayerNorm init, whether it ran on a meta tensor (a real init is ``False``)."""
    import torch

    inits = []
    for cls in (torch.nn.Linear, torch.nn.LayerNorm):
        real = cls.reset_parameters

        def spy(self, real=real):
            inits.append(self.weight is None or self.weight.is_meta)
            return real(self)

        monkeypatch.setattr(cls, "reset_parameters", spy)
    return inits


def pytest_collection_modifyitems(config, items):
    """Every test that reads the official-output fixtures says so in its name (`-k parity` selects them all), and
    every test named parity reads them: tests that need no official outputs build inline tiny models instead."""
    wrong = [item.nodeid for item in items
             if ("parity" in getattr(item, "fixturenames", ())) != ("parity" in item.name)
             and "test_diffusers_rae.py" not in item.nodeid]  # diffusers parity: against diffusers, not fixtures
    if wrong:
        raise pytest.UsageError("tests using the `parity` fixture must have 'parity' in their name and vice versa: "
                                + ", ".join(wrong))
