"""``rae encode`` and ``rae recon``: images through the autoencoder."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import check_out, console, dry_run_option, handle_errors, overrides_argument, resolve_config
from rae_cli.cli.schemas import register


def _rae_preset_option():
    return typer.Option("dinov2-b", "--preset", "-p",
                        help="An rae preset (see `rae presets rae`) or a YAML path: the autoencoder to use.")


@app.command("encode")
@handle_errors
def encode(
    input: Path = typer.Argument(..., help="An image file or a folder of images (recursive)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: latents.safetensors + config.yaml."),
    preset: str = _rae_preset_option(),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Encode images to latents (C, h, w) with the frozen encoder (normalised by the preset's statistics)."""
    from rae_cli.schema import EncodeConfig

    cfg = resolve_config(EncodeConfig, None, overrides, dry_run, base={"rae": preset})
    check_out(out)
    from rae_cli.encode import encode_images

    path = encode_images(cfg, input, out)
    console.print(f"[green]wrote[/] {path}")


@app.command("recon")
@handle_errors
def recon(
    input: Path = typer.Argument(..., help="An image file or a folder of images (recursive)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: recon/*.png, grid.png, metrics.json."),
    preset: str = _rae_preset_option(),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Reconstruct images; report PSNR/SSIM per image and on average (and rFID with rfid=true)."""
    from rae_cli.schema import ReconConfig

    cfg = resolve_config(ReconConfig, None, overrides, dry_run, base={"rae": preset})
    check_out(out)
    from rae_cli.encode import reconstruct_images

    m = reconstruct_images(cfg, input, out)
    line = f"PSNR {m['psnr_mean']:.2f} dB  SSIM {m['ssim_mean']:.4f}  ({m['num_images']} images)"
    if "rfid" in m:
        line += f"  rFID {m['rfid']:.3f}"
    console.print(f"[green]{line}[/] → {out}/metrics.json")


register("encode", "rae_cli.schema:EncodeConfig")
register("recon", "rae_cli.schema:ReconConfig")
register("dit", "rae_cli.schema:DiTConfig")
register("flow", "rae_cli.schema:FlowConfig")
