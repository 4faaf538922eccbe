"""``rae dataset``: write an embedded dataset (no download) as an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import check_out, console, handle_errors


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

    check_out(out)
    counts = export_digits(out, size=size, test_fraction=test_fraction, seed=seed)
    console.print(f"[green]wrote[/] {counts['train']} train and {counts['test']} test images to {out}")


@app.command("eval-digits")
@handle_errors
def eval_digits(
    samples: Path = typer.Argument(..., help="Output folder of `rae sample` (sample_info.json + images)."),
    real: Path = typer.Option(..., "--real", help="Held-out real images (e.g. the test/ folder of `rae dataset`)."),
    real_train: Optional[Path] = typer.Option(None, "--real-train", help="Real training images: adds the "
                                              "train-vs-test Fréchet distance as a floor."),
    recon_metrics: Optional[Path] = typer.Option(None, "--recon-metrics", help="metrics.json of `rae recon`."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the metrics JSON."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a class-by-class sample grid PNG here."),
) -> None:
    """Judge digit samples offline: class accuracy (scikit-learn classifier), Fréchet distance (EfficientNet)."""
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.digits_eval import evaluate_digits

    check_out(out, "file")
    check_out(grid, "file", "--grid")
    m = evaluate_digits(samples, real, real_train_dir=real_train, recon_metrics=recon_metrics, grid_out=grid)
    atomic_write_json(out, m)
    console.print(f"[green]sample_class_accuracy {m['sample_class_accuracy']:.3f}[/]  "
                  f"Fréchet distance {m['frechet_distance']:.2f} → {out}")
