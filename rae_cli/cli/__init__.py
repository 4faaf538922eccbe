"""The ``rae`` command line: one typer app; each module in this package registers its subcommands.

Only this package imports typer. Commands import torch and the library inside their bodies so that
``rae --help`` answers instantly. ``rae --help`` lists the commands by stage (``PANELS``), in pipeline order.
"""

from __future__ import annotations

import importlib
import pkgutil

from rae_cli.cli.app import app

# Register every command module in this package (app, common and schemas hold no commands).
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in ("app", "common", "schemas"):
        importlib.import_module(f"{__name__}.{_mod}")

# `rae --help` groups: stage, then the commands in the order a user runs them. A command missing here is listed
# under "Utilities" (and a test fails, so that it gets a place).
PANELS = {
    "Data & stage 1 (autoencoder)": ["dataset", "encode", "recon", "train-decoder", "export-decoder", "cache-latents"],
    "Stage 2 (diffusion)": ["train-dit", "sample", "convert-dit", "overfit-probe"],
    "Evaluation": ["eval-fid", "eval-digits"],
    "Utilities": ["download", "presets"],
}
_ORDER = {name: i for i, name in enumerate(n for names in PANELS.values() for n in names)}
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}
for _info in app.registered_commands:
    _name = _info.name or _info.callback.__name__.replace("_", "-")
    _info.rich_help_panel = _PANEL_OF.get(_name, "Utilities")
app.registered_commands.sort(key=lambda info: _ORDER.get(info.name or "", len(_ORDER)))


def main() -> None:
    app()
