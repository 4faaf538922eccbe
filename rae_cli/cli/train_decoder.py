"""``rae train-decoder`` (stage-1 training) and ``rae export-decoder`` (checkpoint → model.pt, safetensors, preset)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import (check_out, console, dry_run_option, handle_errors, overrides_argument, preset_option,
                                resolve_config)
from rae_cli.cli.schemas import register


@app.command("train-decoder")
@handle_errors
def train_decoder(
    images: Path = typer.Argument(..., help="Training image folder, searched recursively (sets data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder: config.yaml, checkpoints/, metrics.jsonl, "
                             "samples/, export/. Re-running the same command resumes."),
    preset: str = preset_option("decoder-xl_dinov2-b", "train-decoder"),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Train an RAE decoder on a frozen encoder with L1 + LPIPS + GAN (paper §3); works under torchrun."""
    from rae_cli.memory_plan_decoder import plan_train_decoder
    from rae_cli.train_decoder import TrainDecoderConfig

    cfg = resolve_config(TrainDecoderConfig, preset, [f"data.path={images.resolve()}", *(overrides or [])], dry_run,
                         plan=plan_train_decoder)
    check_out(out, required=True)
    import logging
    import os

    from rae_cli.distributed import Dist, setup_logging
    from rae_cli.train_decoder import train_decoder as run

    # Logging by rank from torchrun's environment; the library owns the process group (init/teardown in try/finally).
    setup_logging(Dist(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))),
                  level=logging.INFO)
    result = run(cfg=cfg, out_dir=out)
    if result.step == result.plan.total_steps:
        console.print(f"[green]done[/]: step {result.step}; decoder exported to {out / 'export'} "
                      f"(rae recon --preset {out / 'export' / 'rae.yaml'} ...)")
    else:
        console.print(f"[yellow]stopped[/] at step {result.step} of {result.plan.total_steps}; re-run the same "
                      "command to continue")


@app.command("export-decoder")
@handle_errors
def export_decoder(
    checkpoint: Path = typer.Argument(..., help="A train-decoder run folder, its checkpoints/ folder, or one "
                                      "checkpoints/step-* folder (a folder with many: the newest)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Export folder (default: <run>/export)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Export the raw decoder weights instead of the EMA."),
    format: str = typer.Option("ours", "--format", help="ours: decoder.safetensors, model.pt, rae.yaml; diffusers: "
                               "also <out>/diffusers, a folder AutoencoderRAE.from_pretrained loads."),
) -> None:
    """Write decoder.safetensors (ours), model.pt (official layout) and rae.yaml (an rae preset using them)."""
    from rae_cli.train_decoder import export_trained_decoder

    if format not in ("ours", "diffusers"):
        raise typer.BadParameter(f"--format must be ours or diffusers, not {format!r}")
    check_out(out)
    path = export_trained_decoder(checkpoint, out, use_ema=not no_ema)
    console.print(f"[green]wrote[/] {path}/decoder.safetensors, model.pt, rae.yaml "
                  f"(rae recon --preset {path / 'rae.yaml'} ...)")
    if format == "diffusers":
        from rae_cli.diffusers_export import export_preset

        folder = export_preset(path / "rae.yaml", path / "diffusers")
        console.print(f"[green]wrote[/] {folder} (diffusers AutoencoderRAE.from_pretrained; rae.source={folder})")


register("train-decoder", "rae_cli.train_decoder:TrainDecoderConfig")
