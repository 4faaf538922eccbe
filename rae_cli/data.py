"""Image inputs: finding images, class labels from sub-folders, the ADM center crop, safe decoding.

Images become float tensors (3, H, W) in [0, 1] (the official pipelines use only ``ToTensor``, spec §9).
A file that cannot be decoded is a :class:`DataError` naming it (or, in bulk jobs, is counted and skipped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rae_cli.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image under a folder (recursive, sorted). Errors if there are none."""
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not path.exists():
        raise DataError(f"input not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return files


@dataclass(frozen=True)
class LabeledImages:
    """Image paths with integer labels; ``classes`` is empty for an unconditional (flat) folder."""

    files: list[Path]
    labels: list[int]
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def scan_image_folder(root: str | Path) -> LabeledImages:
    """Class sub-folders → labels (sorted names, as torchvision's ImageFolder); a flat folder → unconditional.

    A folder with both loose images and class sub-folders is ambiguous and is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    class_dirs = [d for d in subdirs if any(is_image_file(f) for f in d.rglob("*"))]
    if class_dirs and loose:
        raise DataError(f"{root} holds both images and class sub-folders; use one layout "
                        "(sub-folders = classes, or a flat folder = unconditional)")
    if not class_dirs:
        files = list_images(root)
        return LabeledImages(files, [0] * len(files), [])
    files, labels = [], []
    for i, d in enumerate(class_dirs):
        for f in sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p)):
            files.append(f)
            labels.append(i)
    return LabeledImages(files, labels, [d.name for d in class_dirs])


def open_rgb(path: str | Path):
    """Decode an image file to an RGB PIL image, or raise DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    # DecompressionBombError (a header claiming billions of pixels, refused before decoding) is not an OSError.
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def center_crop_arr(image, image_size: int):
    """ADM center crop (spec §9): halve with BOX while the short side ≥ 2·size, BICUBIC to short side = size, crop."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def resize_short_random_crop(image, image_size: int, rng: np.random.Generator, scale: float = 1.5):
    """Stage-1 training transform (spec §2.2): bicubic resize of the short side to 1.5·size, random crop."""
    from PIL import Image

    short = round(scale * image_size)
    w, h = image.size
    r = short / min(w, h)
    image = image.resize((max(short, round(w * r)), max(short, round(h * r))), resample=Image.BICUBIC)
    w, h = image.size
    top = int(rng.integers(0, h - image_size + 1))
    left = int(rng.integers(0, w - image_size + 1))
    return image.crop((left, top, left + image_size, top + image_size))


def to_tensor(image):
    """PIL RGB → float tensor (3, H, W) in [0, 1] (torchvision ``ToTensor``)."""
    import torch

    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | Path, image_size: int | None = None, crop: str = "adm"):
    """One image as a (3, H, W) tensor in [0, 1]; ``crop='adm'`` center-crops to ``image_size``, ``'none'`` keeps it."""
    im = open_rgb(path)
    if image_size is not None and crop == "adm":
        im = center_crop_arr(im, image_size)
    elif image_size is not None and crop == "resize":
        from PIL import Image

        im = im.resize((image_size, image_size), resample=Image.BICUBIC)
    return to_tensor(im)


def load_batch(paths: Sequence[Path], image_size: int, crop: str = "adm", skip_bad: bool = False):
    """Stack images into (B, 3, S, S). With ``skip_bad`` unreadable files are skipped and returned separately.

    Returns (batch or None, kept_indices, bad: list of (path, message)).
    """
    import torch

    tensors, kept, bad = [], [], []
    for i, p in enumerate(paths):
        try:
            tensors.append(load_image(p, image_size, crop))
            kept.append(i)
        except DataError as e:
            if not skip_bad:
                raise
            log.warning("skipping unreadable image: %s", e)
            bad.append((Path(p), str(e)))
    batch = torch.stack(tensors) if tensors else None
    return batch, kept, bad


def save_image(tensor, path: str | Path) -> None:
    """Save a (3, H, W) tensor in [0, 1] as PNG (clamped, rounded to uint8), atomically."""
    from PIL import Image

    from rae_cli.checkpoint import atomic_path

    arr = (tensor.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def make_grid(images, nrow: int, padding: int = 2, pad_value: float = 1.0):
    """Tile (B, 3, H, W) images into one (3, H', W') image, ``nrow`` images per row."""
    import torch

    b, c, h, w = images.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(b):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i].detach().float().cpu()
    return grid
