"""``rae cache-latents``: an image folder → a sharded latent cache + exact latent statistics."""

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


@app.command("cache-latents")
@handle_errors
def cache_latents(
    images: Path = typer.Argument(..., help="Image folder: class sub-folders = labels; a flat folder = "
                                            "unconditional."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache folder (index.json, shard-*.safetensors, "
                                                      "partial-stats/, stats.safetensors). Re-run to resume."),
    preset: Optional[str] = preset_option("dinov2-b_in256", "cache-latents"),
    dry_run: bool = dry_run_option(),
    overrides: Optional[List[str]] = overrides_argument(),
) -> None:
    """Encode an image folder once into a sharded latent cache (ADM crop, optional mirrors) + exact latent stats.

    Shards are written in the background while the next is encoded; the stats are summed while encoding (no
    second pass over the cache). Under torchrun the shards left to do are dealt out to the processes.

    Examples: rae cache-latents data/train --out cache/in256 ;
    torchrun --nproc_per_node 8 -m rae_cli cache-latents data/train --out cache/in256 dtype=fp16
    """
    from rae_cli.latent_cache import CacheLatentsConfig

    cfg = resolve_config(CacheLatentsConfig, preset, overrides, dry_run)
    check_out(out, required=True)
    _setup_logging()
    from rae_cli.latent_cache import cache_latents as run

    path = run(cfg, images, out)
    if int(os.environ.get("RANK", "0")) == 0:
        import json

        index = json.loads((path / "index.json").read_text())
        console.print(f"[green]latent cache[/] {path}: {index['num_images']} images ({index['num_entries']} latents "
                      f"{index['latent_shape']} {index['dtype']}), {index['num_bad']} unreadable skipped; stats → "
                      f"{path / index['stats']}")


register("cache-latents", "rae_cli.latent_cache:CacheLatentsConfig")
