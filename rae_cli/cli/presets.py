"""``rae presets``: list the shipped presets, one line each; ``--keys KIND`` shows a config schema."""

from __future__ import annotations

from typing import Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import handle_errors


@app.command("presets")
@handle_errors
def presets(kind: Optional[str] = typer.Argument(None, help="Only this kind (rae, train-dit, sample, ...)."),
            keys: bool = typer.Option(False, "--keys", help="Also list every config key of KIND with its help "
                                      "(without KIND: of every kind).")
            ) -> None:
    """List the shipped presets (kind/name and a one-line description)."""
    from rich.console import Console
    from rich.table import Table

    from rae_cli.config import list_presets, preset_path, preset_summary

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("preset")
    table.add_column("description")
    for name in list_presets(kind):
        k, n = (kind, name) if kind else name.split("/", 1)
        table.add_row(name, preset_summary(preset_path(k, n)))
    Console().print(table)
    if keys:
        from rae_cli.cli.schemas import SCHEMAS
        from rae_cli.config import describe

        if kind is not None and kind not in SCHEMAS:
            raise typer.BadParameter(f"no schema for {kind!r}; kinds: {', '.join(sorted(SCHEMAS))}")
        for k in [kind] if kind else sorted(SCHEMAS):  # no kind: every kind's keys, one table each
            keys_table = Table(title=f"{k} keys" if not kind else None, title_justify="left", show_header=True,
                               header_style="bold", box=None)
            for col in ("key", "default", "help"):
                keys_table.add_column(col)
            for row in describe(SCHEMAS[k]()):
                keys_table.add_row(*row)
            Console().print(keys_table)
