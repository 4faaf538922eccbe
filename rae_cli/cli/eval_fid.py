"""``rae eval-fid``: FID / Inception Score / precision-recall of generated images against a reference."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import check_out, console, dry_run_option, fail, handle_errors, preset_option
from rae_cli.cli.schemas import register

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_arguments(items: List[str]) -> tuple[list[str], list[str]]:
    """Positional paths (GENERATED, REFERENCE) apart from ``key=value`` overrides."""
    paths = [a for a in items if not _OVERRIDE.match(a)]
    overrides = [a for a in items if _OVERRIDE.match(a)]
    return paths, overrides


@app.command("eval-fid")
@handle_errors
def eval_fid(
    args: Optional[List[str]] = typer.Argument(None, metavar="GENERATED [REFERENCE] [KEY=VALUE]...",
                                               help="Generated images (folder or .npz), the reference (folder, "
                                                    ".npz, or ADM reference batch with mu/sigma), then overrides."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON to this file "
                                                                 "(default: print the JSON)."),
    preset: Optional[str] = preset_option(None, "eval-fid"),
    dry_run: bool = dry_run_option(),
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor", hidden=True,
                                                    help="TEST ONLY: random-test-double."),
) -> None:
    """FID (torch-fidelity Inception), Inception Score and precision/recall, as JSON.

    Example: rae eval-fid samples/samples.npz VIRTUAL_imagenet256_labeled.npz --out fid.json
    """
    from rae_cli.config import resolve, to_yaml
    from rae_cli.evaluate import EvalFIDConfig

    paths, overrides = split_arguments(list(args or []))
    if len(paths) > 2:
        fail(f"expected at most GENERATED and REFERENCE, got {len(paths)} paths: {' '.join(paths)}")
    base = dict(zip(("generated", "reference"), paths))
    cfg = resolve(EvalFIDConfig, preset=preset, overrides=overrides, base=base)
    if dry_run:
        sys.stdout.write(to_yaml(cfg))
        raise typer.Exit(0)
    check_out(out, "file")

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from rae_cli.evaluate import TEST_DOUBLE_WARNING, evaluate_fid, summary_line, wants_test_double
    from rae_cli.weights import WeightsNotFoundError

    test_double = wants_test_double(feature_extractor)
    if test_double:
        console.print(f"[bold red on yellow] {TEST_DOUBLE_WARNING} [/]", highlight=False, soft_wrap=True)
    try:
        result = evaluate_fid(cfg, out, test_double=test_double)
    except WeightsNotFoundError as e:
        fail(str(e))
    console.print(f"[green]{summary_line(result)}[/]" + (f" → {out}" if out else ""), highlight=False, soft_wrap=True)
    if out is None:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")


register("eval-fid", "rae_cli.evaluate:EvalFIDConfig")
