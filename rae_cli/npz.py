"""Sample/reference batches in the ADM evaluation-suite format (spec §7): uint8 NHWC images under ``arr_0``.

An ``.npz`` may instead (or also) hold Inception statistics ``mu``/``sigma`` (ADM reference batches such as
``VIRTUAL_imagenet256_labeled.npz``, and our own statistics cache). Folders of images convert to the same arrays.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from rae_cli.checkpoint import atomic_path
from rae_cli.data import list_images, open_rgb
from rae_cli.errors import DataError

log = logging.getLogger(__name__)

IMAGES_KEY = "arr_0"  # the key np.savez gives a positional array; the ADM suite reads it by this name


@dataclass(frozen=True)
class ReferenceStats:
    """Fréchet statistics of a reference set: ``mu`` (D,) and ``sigma`` (D, D), float64.

    ``features`` (N, D) float32 are the per-image pool features when known (needed for precision/recall);
    ``num_images`` is N when known (ADM reference batches do not record how many train images they summarise);
    ``extractor`` names the feature extractor when known (ADM batches: TF Inception, recorded as None).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_images: int | None = None
    extractor: str | None = None


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1], (B, 3, H, W) or (3, H, W) tensor → uint8 channels-last numpy (B, H, W, 3) / (H, W, 3).

    The conversion copies the official RAE sampler (``sample_ddp.py``, spec §7): clamp to [0, 1], multiply by 255
    and cast, which **truncates** (0.999 → 254), it does not round. ADM's own sample scripts truncate as well
    (``((x + 1) * 127.5).clamp(0, 255).to(uint8)`` on [-1, 1]), so FID numbers stay comparable with both.
    """
    import torch

    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_uint8 expects a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"to_uint8 expects (B, 3, H, W) or (3, H, W) images, got shape {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).mul(255).to(torch.uint8)  # float→uint8 cast truncates toward 0
    return x.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


def check_images_array(arr: np.ndarray, what: str = "images") -> np.ndarray:
    """Raise a DataError unless ``arr`` is uint8 of shape (N, H, W, 3); return it unchanged."""
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{what}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"{what}: expected uint8 images of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def save_npz(path: str | Path, arr: np.ndarray) -> Path:
    """Write uint8 (N, H, W, 3) images to ``path`` under ``arr_0`` (uncompressed, like the ADM suite), atomically."""
    check_images_array(arr, f"save_npz({path})")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a name: np.savez would append ".npz" to the temporary name.
        np.savez(f, **{IMAGES_KEY: arr})
    return path


def save_image_folder(arr: np.ndarray, folder: str | Path, start_index: int = 0, durable: bool = True
                      ) -> list[Path]:
    """Write uint8 (N, H, W, 3) images as ``{index:06d}.png`` (the official sampler's names), atomically each
    (``durable=False``: without fsync, see :func:`rae_cli.checkpoint.atomic_path`; check with :func:`png_complete`)."""
    from PIL import Image

    check_images_array(arr, "save_image_folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(arr):
        path = folder / f"{start_index + i:06d}.png"
        with atomic_path(path, durable=durable) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    return paths


def png_complete(path: str | Path) -> bool:
    """True if ``path`` is a PNG that ends with its IEND chunk (what a power cut before the data reached the disk
    would not leave: a zero-length or cut-short file). Reads 8 + 12 bytes, not the image."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            f.seek(-12, 2)
            return f.read(12)[4:8] == b"IEND"
    except OSError:
        return False


def save_reference_stats(path: str | Path, stats: ReferenceStats) -> Path:
    """Write ``mu``/``sigma`` (plus ``features``/``num_images``/``extractor`` when known) as an npz, atomically."""
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    if stats.num_images is not None:
        arrays["num_images"] = np.asarray(stats.num_images, np.int64)
    if stats.extractor is not None:
        arrays["extractor"] = np.asarray(stats.extractor)  # a unicode scalar: readable without pickle
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


# ---------------------------------------------------------------------------------------------- reading


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read {path} as an .npz file: {e}") from e


def read_stats(path: str | Path) -> ReferenceStats | None:
    """The ``mu``/``sigma`` statistics stored in an ``.npz`` (ADM reference batch or our cache), or None."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or "mu" not in _npz_keys(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        if "sigma" not in f.files:
            raise DataError(f"{path} has 'mu' but no 'sigma'; a reference batch needs both")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = f["features"] if "features" in f.files else None
        num = int(f["num_images"]) if "num_images" in f.files else None
        extractor = str(f["extractor"]) if "extractor" in f.files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return ReferenceStats(mu=mu, sigma=sigma, features=features, num_images=num, extractor=extractor)


def has_images(path: str | Path) -> bool:
    """True if ``path`` is a folder or an ``.npz`` holding ``arr_0`` images."""
    path = Path(path)
    if path.is_dir():
        return True
    return path.suffix.lower() == ".npz" and IMAGES_KEY in _npz_keys(path)


def _npz_images_header(zf: zipfile.ZipFile, path: Path):
    """Open ``arr_0.npy`` inside the zip and read its header: (open member, shape, fortran_order, dtype)."""
    member = zf.open(f"{IMAGES_KEY}.npy")
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        member.close()
        raise DataError(f"{path}: unsupported .npy format version {version} for {IMAGES_KEY}")
    return member, shape, fortran, dtype


def count_images(path: str | Path) -> int:
    """How many images ``path`` (folder or npz with ``arr_0``) holds, without decoding them."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return len(list_images(path))
    if IMAGES_KEY not in _npz_keys(path):
        raise DataError(f"{path} has no '{IMAGES_KEY}' images (keys: {', '.join(_npz_keys(path))})")
    with zipfile.ZipFile(path) as zf:
        member, shape, _, _ = _npz_images_header(zf, path)
        member.close()
    return int(shape[0]) if shape else 0


def iter_image_batches(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """Stream uint8 (b, H, W, 3) batches from an npz (``arr_0``) or an image folder (sorted, recursive, RGB).

    Memory stays at one batch: 50k images at 512² are 39 GB, more than a host may hold. The npz member is read
    sequentially from the zip (compressed or not). Folder images must all have the same size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        yield from _iter_npz(path, batch_size)
    else:
        yield from _iter_folder(path, batch_size)


def _iter_npz(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    keys = _npz_keys(path)
    if IMAGES_KEY not in keys:
        hint = " (it holds statistics only; use it as a reference)" if "mu" in keys else ""
        raise DataError(f"{path} has no '{IMAGES_KEY}' images{hint}; keys: {', '.join(keys)}")
    with zipfile.ZipFile(path) as zf:
        member, shape, fortran, dtype = _npz_images_header(zf, path)
        with member:
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise DataError(f"{path}: '{IMAGES_KEY}' must be C-ordered uint8 (N, H, W, 3), got {dtype} {shape}"
                                f"{' (Fortran order)' if fortran else ''}")
            n, per_image = shape[0], int(np.prod(shape[1:]))
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                buf = member.read(b * per_image)
                if len(buf) != b * per_image:
                    raise DataError(f"{path}: '{IMAGES_KEY}' is truncated at image {start + len(buf) // per_image}")
                yield np.frombuffer(buf, np.uint8).reshape(b, *shape[1:])


def _iter_folder(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    files = list_images(path)  # sorted, recursive; DataError if missing or empty
    size = None
    batch: list[np.ndarray] = []
    for file in files:
        image = np.asarray(open_rgb(file), dtype=np.uint8)  # (H, W, 3); DataError naming a corrupt file
        if size is None:
            size = image.shape
        elif image.shape != size:
            raise DataError(f"{file} is {image.shape[1]}x{image.shape[0]} but {files[0]} is {size[1]}x{size[0]}; "
                            "all images of a set must have the same size (center-crop them first)")
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def load_images_array(path: str | Path) -> np.ndarray:
    """All images of an npz (``arr_0``) or a folder (sorted, recursive, RGB) as one uint8 (N, H, W, 3) array."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"images not found: {path}")
    return np.concatenate(list(iter_image_batches(path, batch_size=1024)))


def load_reference(path: str | Path) -> ReferenceStats | np.ndarray:
    """A reference set: precomputed statistics when the npz has ``mu``/``sigma`` (ADM reference batch), else images.

    ADM's evaluator does the same: it uses a reference batch's ``mu``/``sigma`` for FID when present and its
    ``arr_0`` images only for the other metrics (see :func:`has_images` to tell whether those exist).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"reference not found: {path}")
    stats = read_stats(path)
    return stats if stats is not None else load_images_array(path)
