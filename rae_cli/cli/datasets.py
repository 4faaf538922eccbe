"""``rae dataset``: write an embedded dataset (no download) as an image folder."""

from __future__ import annotations

from pathlib import Path

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import console, handle_errors


@app.command("dataset")
@handle_errors
def dataset(
    name: str = typer.Argument(..., help="Embedded dataset: digits (scikit-learn's 1,797 labelled 8×8 digits)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: train/<class>/*.png and test/<class>/*.png."),
    size: int = typer.Option(32, help="Upsample the images to this side (bicubic)."),
    test_fraction: float = typer.Option(0.2, help="Share of every class held out in test/."),
    seed: int = typer.Option(0, help="Seed of the stratified split."),
) -> None:
    """Export an embedded dataset as class sub-folders of PNGs, ready for every `rae` command."""
    from rae_cli.errors import DataError

    if name != "digits":
        raise DataError(f"unknown embedded dataset {name!r}; available: digits")
    from rae_cli.toy_data import export_digits

    counts = export_digits(out, size=size, test_fraction=test_fraction, seed=seed)
    console.print(f"[green]wrote[/] {counts['train']} train and {counts['test']} test images to {out}")
