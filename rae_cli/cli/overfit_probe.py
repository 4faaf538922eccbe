"""``rae overfit-probe``: Theorem 1's width diagnostic — overfit one latent with DiTs of several widths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import (check_out, console, dry_run_option, fail, handle_errors, overrides_argument, preset_option,
                                resolve_config)
from rae_cli.cli.schemas import register


def _int_list(text: str, option: str) -> str:
    """"8,16,32" → "[8,16,32]" (an override value), or a clear error."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option)
    return "[" + ",".join(items) + "]"


def _flag_overrides(**values) -> list[str]:
    """The probe's own options, written as ``key=value`` overrides (they win over the preset and KEY=VALUE)."""
    return [f"{key}={value}" for key, value in values.items() if value is not None]


@app.command("overfit-probe")
@handle_errors
def overfit_probe(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder: probe.csv, probe.json, probe.png, "
                                                                  "config.yaml."),
    latent_channels: Optional[int] = typer.Option(None, "--latent-channels", help="Channels n of the synthetic "
                                                                                  "latent (latent_channels=)."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Token grid side of the synthetic latent (grid=)."),
    widths: Optional[str] = typer.Option(None, "--widths", help="Comma-separated model widths, e.g. 8,16,32,64."),
    depths: Optional[str] = typer.Option(None, "--depth", "--depths", help="Comma-separated model depths, e.g. 2 "
                                                                           "or 2,4."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per model (steps=)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (lr=)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (seed=)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Overfit this image's latent under the preset's rae "
                                                               "section instead of a synthetic latent."),
    check_preset: Optional[str] = typer.Option(None, "--check-preset", help="Only check a train-dit preset's width "
                                                                            "against its encoder's channels and print "
                                                                            "the bound (exit 1 if too narrow)."),
    preset: Optional[str] = preset_option("default", "overfit-probe"),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Train DiTs of several widths to overfit one latent; report each final loss next to Theorem 1's floors.

    Example: rae overfit-probe --latent-channels 32 --grid 4 --widths 8,16,32,64 --depth 2 --steps 1500 --out probe/
    """
    if check_preset is not None:
        from rae_cli.probe import check_train_preset

        from rich.console import Console

        check = check_train_preset(check_preset)
        color = "green" if check.ok else "red"
        Console().print(f"[bold {color}]{'ok' if check.ok else 'too narrow'}[/]: {check.message()}", highlight=False)
        raise typer.Exit(0 if check.ok else 1)  # scripts can test the exit status

    flags = _flag_overrides(
        latent_channels=latent_channels, grid=grid, steps=steps, lr=lr, seed=seed,
        widths=_int_list(widths, "--widths") if widths is not None else None,
        depths=_int_list(depths, "--depth") if depths is not None else None,
        image=json.dumps(str(image)) if image is not None else None)  # quoted: any path stays a string
    from rae_cli.probe import ProbeConfig

    cfg = resolve_config(ProbeConfig, preset, list(overrides or []) + flags, dry_run)
    if out is None:
        fail("--out DIR is required (where probe.csv, probe.json and probe.png go)")
    check_out(out)
    from rae_cli.probe import run_probe

    result = run_probe(cfg, out)
    _print_table(result)


def _print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    n = result.latent_shape[0]
    table = Table(title=f"overfit-probe: {result.source}, n = {n}, {result.latent_shape[1] * result.latent_shape[2]} "
                        "tokens", header_style="bold")
    for col in ("width", "depth", "final loss", "paper bound", "exact floor", "verdict"):
        table.add_column(col, justify="right" if col != "verdict" else "left")
    for r in result.rows:
        color = "green" if r.verdict.startswith("fits") else "red" if r.width < n else "yellow"
        table.add_row(str(r.width), str(r.depth), f"{r.final_loss:.4f}", f"{r.bound:.4f}", f"{r.exact_bound:.4f}",
                      f"[{color}]{r.verdict}[/]")
    Console().print(table)
    console.print(f"{len(result.rows)} models in {result.seconds:.0f} s → {result.out_dir}/probe.csv, probe.json, "
                  "probe.png", highlight=False)


register("overfit-probe", "rae_cli.probe:ProbeConfig")
