"""``rae train-dit``: stage-2 training of a DiT / DiT-DH on RAE latents (from a latent cache or on the fly)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import (check_out, console, dry_run_option, handle_errors, overrides_argument, preset_option,
                                resolve_config)
from rae_cli.cli.schemas import register


def _setup_logging() -> None:
    import logging

    from rae_cli.distributed import Dist, setup_logging

    setup_logging(Dist(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))),
                  level=logging.INFO)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@app.command("train-dit")
@handle_errors
def train_dit(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (config.yaml, metrics.jsonl, checkpoints/). "
                                                      "Re-run the same command to resume."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Latent cache from `rae cache-latents`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder, encoded on the fly instead."),
    preset: Optional[str] = preset_option("dit-dh-xl_dinov2-b_in256", "train-dit"),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Train a DiT / DiT-DH on RAE latents (flow matching); 1 process or torchrun -m rae_cli train-dit.

    Examples: rae train-dit -p tiny --cache cache/ --out runs/tiny ;
    torchrun --nproc_per_node 8 -m rae_cli train-dit -p dit-dh-xl_dinov2-b_in256 --cache cache/in256 --out runs/xl
    """
    from rae_cli.train_dit import TrainDiTConfig

    base = {}
    if cache is not None:
        base["cache"] = str(cache)
    if data is not None:
        base["images"] = str(data)
    from rae_cli.memory_plan import plan_train_dit

    cfg = resolve_config(TrainDiTConfig, preset, overrides, dry_run, base=base, plan=plan_train_dit)
    check_out(out, required=True)
    _setup_logging()
    from rae_cli.train_dit import train_dit as run

    path = run(cfg=cfg, out_dir=out)
    if _is_main():
        console.print(f"[green]trained[/] → {path}")


register("train-dit", "rae_cli.train_dit:TrainDiTConfig")
