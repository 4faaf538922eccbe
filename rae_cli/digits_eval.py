"""Judging class-conditional samples of the embedded digits dataset, fully offline (the quickstart's last step).

- ``sample_class_accuracy``: the share of generated images that a scikit-learn classifier trained on the real 8×8
  digits (train split only) assigns to the class they were conditioned on.
- ``frechet_distance``: Fréchet distance between generated and held-out real images in the feature space of the
  pretrained EfficientNet-Lite0 (offline; **not** FID), next to the same distance between the real train and test
  splits as a floor for judging it.
- reconstruction PSNR/SSIM copied from a ``rae recon`` metrics.json, when given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rae_cli.errors import DataError

log = logging.getLogger(__name__)


def _sample_images_and_labels(samples_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from rae_cli.npz import load_images_array

    info_path = samples_dir / "sample_info.json"
    if not info_path.is_file():
        raise DataError(f"{info_path} not found: give the output folder of `rae sample`")
    labels = np.asarray(json.loads(info_path.read_text())["labels"], dtype=np.int64)
    npz_path = samples_dir / "samples.npz"
    images = load_images_array(npz_path if npz_path.is_file() else samples_dir / "images")
    if len(images) != len(labels):
        raise DataError(f"{samples_dir}: {len(images)} images but {len(labels)} labels; re-run `rae sample` to finish")
    return images, labels


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Rows = classes 0..K-1, ``per_class`` samples each (blank where fewer), 2-px white padding; uint8 HWC."""
    h, w = images.shape[1:3]
    pad = 2
    grid = np.full((num_classes * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c in range(num_classes):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y, x = pad + c * (h + pad), pad + k * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    return grid


def evaluate_digits(samples_dir: str | Path, real_dir: str | Path, *, real_train_dir: str | Path | None = None,
                    recon_metrics: str | Path | None = None, grid_out: str | Path | None = None,
                    per_class: int = 10, device: str = "cpu") -> dict:
    """Metrics for ``rae sample`` output on the digits; optionally writes the class-by-class grid PNG."""
    from rae_cli.fid import compute_statistics, frechet_distance, get_extractor
    from rae_cli.npz import load_images_array
    from rae_cli.toy_data import fit_digit_classifier, to_digit_features

    samples_dir = Path(samples_dir)
    images, labels = _sample_images_and_labels(samples_dir)
    clf = fit_digit_classifier()
    pred = clf.predict(to_digit_features(images))
    correct = pred == labels
    per_class_acc = {str(c): float(correct[labels == c].mean()) for c in np.unique(labels)}

    extractor = get_extractor("efficientnet-lite0", device=device)
    real = load_images_array(real_dir)
    mu_g, sig_g = compute_statistics(images, extractor)
    mu_r, sig_r = compute_statistics(real, extractor)
    metrics: dict = {
        "sample_class_accuracy": float(correct.mean()),
        "sample_class_accuracy_per_class": per_class_acc,
        "num_samples": int(len(images)),
        "frechet_distance": frechet_distance(mu_g, sig_g, mu_r, sig_r),
        "frechet_distance_features": extractor.name + " (offline; not FID)",
        "num_real": int(len(real)),
    }
    if real_train_dir is not None:
        mu_t, sig_t = compute_statistics(load_images_array(real_train_dir), extractor)
        metrics["frechet_distance_real_train_vs_test"] = frechet_distance(mu_t, sig_t, mu_r, sig_r)
    if recon_metrics is not None:
        rm = json.loads(Path(recon_metrics).read_text())
        metrics["reconstruction_psnr"] = rm["psnr_mean"]
        metrics["reconstruction_ssim"] = rm["ssim_mean"]
    if grid_out is not None:
        from PIL import Image

        from rae_cli.checkpoint import atomic_path

        grid = class_grid(images, labels, int(labels.max()) + 1, per_class)
        with atomic_path(grid_out) as tmp:
            Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG")
    return metrics
