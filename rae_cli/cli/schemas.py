"""Preset kind → config schema, loaded lazily (so ``rae --help`` imports no torch)."""

from __future__ import annotations

import importlib


class _Lazy(dict):
    """``SCHEMAS[kind]()`` returns the dataclass for that preset kind."""


_TABLE = {
    "rae": "rae_cli.schema:RAEConfig",
}


def _loader(spec: str):
    def load():
        mod, name = spec.split(":")
        return getattr(importlib.import_module(mod), name)

    return load


SCHEMAS = _Lazy({k: _loader(v) for k, v in _TABLE.items()})


def register(kind: str, spec: str) -> None:
    SCHEMAS[kind] = _loader(spec)
