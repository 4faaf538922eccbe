"""``rae download``: fetch the external weights the toolkit uses into their one documented place."""

from __future__ import annotations

from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import console, handle_errors


@app.command("download")
@handle_errors
def download(
    names: Optional[List[str]] = typer.Argument(None, help="Artifact names (see --list)."),
    list_: bool = typer.Option(False, "--list", "-l", help="List every artifact, where it goes, and whether it is here."),
    force: bool = typer.Option(False, "--force", help="Download again even if a local copy exists."),
) -> None:
    """Download encoders, released RAE decoders/stats/DiT-DH checkpoints, LPIPS VGG, FID Inception, DINO disc.

    Files go to $RAE_HOME (default ~/.cache/rae), the Hugging Face cache, or the torch hub checkpoints folder
    (see `rae download --list`). Offline (HF_HUB_OFFLINE=1 or no network) it fails at once and says where to put
    a copy by hand.
    """
    from rae_cli import weights

    if list_ or not names:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", box=None)
        for col in ("name", "what", "status / location"):
            table.add_column(col)
        for name, art in weights.ARTIFACTS.items():
            try:
                status = f"[green]present[/] {weights.resolve(name)}"
            except weights.WeightsNotFoundError:
                looked = weights.candidates(name)
                status = "[yellow]missing[/]" + (f" → {looked[0]}" if looked else "")
            table.add_row(name, art.description, status)
        Console().print(table)
        if not names:
            return
    unknown = [n for n in names if n not in weights.ARTIFACTS]
    if unknown:
        raise weights.WeightsNotFoundError(f"unknown artifact(s) {', '.join(unknown)}; known: "
                                           + ", ".join(weights.ARTIFACTS))
    for name in names:
        path = weights.download(name, force=force)
        console.print(f"[green]ok[/] {name}: {path}")
