"""``rae sample`` (images from a stage-2 model) and ``rae convert-dit`` (official stage-2 .pt → our folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import check_out, console, dry_run_option, fail, handle_errors, overrides_argument, preset_option
from rae_cli.cli.schemas import register


def _setup_logging() -> None:
    import logging

    from rae_cli.distributed import Dist, setup_logging

    setup_logging(Dist(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))),
                  level=logging.INFO)


def _resolve(preset: Optional[str], overrides: Optional[List[str]], dry_run: bool):
    from rae_cli.cli.common import print_dry_run
    from rae_cli.memory_plan import plan_sample_command
    from rae_cli.sample import resolve_sample_config

    _, cfg = resolve_sample_config(preset, list(overrides or []))
    if dry_run:
        print_dry_run(cfg, plan_sample_command)
    return cfg


@app.command("sample")
@handle_errors
def sample(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder: images/*.png, samples.npz, grid.png, "
                                                      "sample_info.json, config.yaml. Re-run to resume."),
    preset: Optional[str] = preset_option(None, "sample"),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Generate images with a stage-2 model (our checkpoint folder, an official .pt or a released name).

    Examples: rae sample -p dit-dh-xl_in256_ag --out samples num_images=50000 ;
    rae sample --out s checkpoint=runs/tiny labels=[1,2,3] ; torchrun --nproc_per_node 8 -m rae_cli sample ...
    """
    cfg = _resolve(preset, overrides, dry_run)
    check_out(out, required=True)
    _setup_logging()
    from rae_cli.sample import sample as run_sample
    from rae_cli.weights import WeightsNotFoundError

    try:
        summary = run_sample(cfg, out)
    except WeightsNotFoundError as e:
        fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        nfe = summary.nfe_per_image
        speed = (f", {summary.images_per_second:.2f} images/s" if summary.images_per_second else "")
        evals = (f", network evaluations per image: {nfe['main']:g} main"
                 + (f" + {nfe['guide']:g} guide" if nfe.get("guide") else "") if nfe else "")
        console.print(f"[green]{summary.num_images} images[/] ({summary.generated} new{speed}{evals}) → {out}"
                      + (f"  npz: {summary.npz}" if summary.npz else ""), highlight=False, soft_wrap=True)
    from rae_cli.distributed import shutdown

    shutdown()


@app.command("convert-dit")
@handle_errors
def convert_dit(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: model.safetensors + config.yaml."),
    preset: Optional[str] = preset_option(None, "sample"),
    guide: bool = typer.Option(False, "--guide", help="Convert the preset's AutoGuidance guide model instead."),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Convert an official stage-2 checkpoint (raw, {'ema': ...} or training .pt) into our checkpoint folder.

    Takes the same settings as `rae sample`: e.g. rae convert-dit -p dit-dh-xl_in256 --out ditdh-xl-256, or
    rae convert-dit --out o checkpoint=stage2_model.pt dit.name=DiT-DH-S rae=dinov2-b. The folder then works as
    checkpoint=OUT (its config.yaml names the architecture, the autoencoder and the flow settings).
    """
    from dataclasses import asdict

    cfg = _resolve(preset, overrides, dry_run)
    check_out(out)
    _setup_logging()
    from rae_cli.stage2_loading import convert_official
    from rae_cli.weights import WeightsNotFoundError

    extra = {k: asdict(getattr(cfg, k)) for k in ("rae", "flow") if getattr(cfg, k) is not None}
    try:
        if guide:
            g = cfg.guidance
            if not g.guide_checkpoint:
                fail("--guide: this config has no guidance.guide_checkpoint")
            path = convert_official(g.guide_checkpoint, g.guide_dit, out, latent_shape=cfg.latent_shape,
                                    num_classes=cfg.num_classes, weights=g.guide_weights, extra_config=extra)
        else:
            if not cfg.checkpoint:
                fail("nothing to convert: set checkpoint=<official .pt or artifact name>")
            path = convert_official(cfg.checkpoint, cfg.dit, out, latent_shape=cfg.latent_shape,
                                    num_classes=cfg.num_classes, weights=cfg.weights, extra_config=extra)
    except WeightsNotFoundError as e:
        fail(str(e))
    console.print(f"[green]converted[/] → {path} (model.safetensors + config.yaml)")


register("sample", "rae_cli.sample:SampleConfig")
