"""The whole-run outputs of ``rae sample``: the ADM ``.npz`` streamed from the PNGs, the grid, and the packed
latents of a decode=false run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rae_cli.sample_config import LATENTS_NAME
from rae_cli.sample_resume import latent_path

def write_npz_from_pngs(paths: list[Path], out: Path) -> Path:
    """Pack PNGs (in the given order) into an ADM-style ``.npz`` (``arr_0`` uint8 (N, H, W, 3)), streaming.

    The array is written image by image into the zip member, so memory stays at one image (50k images at 512²
    are 39 GB). Uncompressed, like ``np.savez``; written to a temporary name, then renamed.
    """
    import zipfile

    import numpy as np

    from rae_cli.checkpoint import atomic_path
    from rae_cli.data import open_rgb
    from rae_cli.errors import DataError
    from rae_cli.npz import IMAGES_KEY

    first = np.asarray(open_rgb(paths[0]), dtype=np.uint8)
    shape = (len(paths), *first.shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header) if _needs_v2(header) else \
                    np.lib.format.write_array_header_1_0(member, header)
                for p in paths:
                    image = np.asarray(open_rgb(p), dtype=np.uint8)
                    if image.shape != first.shape:
                        raise DataError(f"{p} is {image.shape} but {paths[0]} is {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
    return out


def _needs_v2(header: dict) -> bool:
    """npy format 1.0 limits the header to 65535 bytes; only absurd shapes need 2.0."""
    return len(repr(header)) > 65000


def write_grid(paths: list[Path], out: Path) -> Path:
    """A grid of the given PNGs, about square."""
    import numpy as np

    from rae_cli.data import make_grid, open_rgb, save_image

    images = torch.stack([torch.from_numpy(np.array(open_rgb(p), dtype=np.uint8)).permute(2, 0, 1)
                          for p in paths]).float() / 255.0  # (B, 3, H, W)
    save_image(make_grid(images, nrow=max(1, math.ceil(math.sqrt(len(paths))))), out)
    return out


def _pack_latents(out_dir: Path, num_images: int) -> Path:
    """All per-image latents (decode=false) in one safetensors file: ``latents`` (N, C, h, w) fp32 and ``labels``
    (N,) int64, streamed image by image (memory stays at one latent: 50k latents at 512² are 157 GB)."""
    import struct

    from rae_cli.checkpoint import atomic_path, load_safetensors
    from rae_cli.errors import DataError

    first, _ = load_safetensors(latent_path(out_dir, 0))
    shape = tuple(first["latent"].shape)
    per = first["latent"].numel() * 4
    meta = {"normalized": "true", "note": "sampled latents in the normalised space (decode with the RAE)"}
    header = {"__metadata__": meta,
              "latents": {"dtype": "F32", "shape": [num_images, *shape], "data_offsets": [0, per * num_images]},
              "labels": {"dtype": "I64", "shape": [num_images],
                         "data_offsets": [per * num_images, per * num_images + 8 * num_images]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    labels = []
    out = out_dir / LATENTS_NAME
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i in range(num_images):
            tensors, info = load_safetensors(latent_path(out_dir, i))
            z = tensors["latent"].float().contiguous()
            if tuple(z.shape) != shape:
                raise DataError(f"{latent_path(out_dir, i)} holds a latent of shape {tuple(z.shape)}, not {shape}")
            f.write(z.numpy().tobytes())
            labels.append(int(info["label"]))
        f.write(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    return out
