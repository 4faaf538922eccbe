"""The ``rae`` command line: one typer app; each module in this package registers its subcommands.

Only this package imports typer. Commands import torch and the library inside their bodies so that
``rae --help`` answers instantly.
"""

from __future__ import annotations

import importlib
import pkgutil

from rae_cli.cli.app import app

# Register every command module in this package (app, common and schemas hold no commands).
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in ("app", "common", "schemas"):
        importlib.import_module(f"{__name__}.{_mod}")


def main() -> None:
    app()
