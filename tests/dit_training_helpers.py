"""Shared helpers for the train-dit / cache-latents tests: a synthetic latent cache and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rae_cli.config import resolve
from rae_cli.schema import RAEConfig


def synthetic_cache(root: Path, n: int = 32, classes: int = 4, shape=(32, 4, 4), seed: int = 0,
                    dtype: str = "fp32") -> Path:
    """A latent cache of ``n`` random latents (+ mirrors) with the tiny rae's shape, made without an encoder."""
    from rae_cli.latent_cache import write_cache

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=g) * 1.5 + 0.5  # raw latents: not zero-mean / unit-variance
    mirrors = torch.randn(n, *shape, generator=g) * 1.5 + 0.5
    return write_cache(root, z, [i % classes for i in range(n)], rae=resolve(RAEConfig, preset="tiny"),
                       classes=[f"c{i}" for i in range(classes)], mirrors=mirrors, dtype=dtype, shard_size=10)


def image_folder(root: Path, per_class: int = 3, classes: int = 2, size: int = 40, seed: int = 0) -> Path:
    """Small random RGB PNGs in class sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.png")
    return root
