"""Judging class-conditional samples of the embedded digits dataset, fully offline (the quickstart's last step).

- ``sample_class_accuracy``: the share of generated images that a scikit-learn classifier trained on the real 8×8
  digits (train split only) assigns to the class they were conditioned on.
- ``frechet_distance``: Fréchet distance between generated and held-out real images in the feature space of the
  pretrained EfficientNet-Lite0 (offline; **not** FID), next to the same distance between the real train and test
  splits as a floor for judging it, and ``frechet_distance_real_floor_same_n``: real train digits, as many as there
  are samples, against the same test split (the Fréchet distance is biased upward at small sample counts).
- ``frechet_distance_digits_mlp``: the same distance in an **independent** feature space, the hidden layer of a small
  MLP trained on the digits' train split only (``frechet_distance`` uses EfficientNet-Lite0, the very network the
  quickstart RAE encodes with), with its own real-vs-real floor;
- ``sample_diversity_ratio``: per class, the mean pairwise distance between samples over the mean pairwise distance
  between held-out real digits of that class, in EfficientNet-Lite0 features, averaged over classes (1 = as varied as
  real digits; guidance that trades diversity for fidelity pushes it below 1); ``…_digits_mlp`` in the judge's space;
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


def _folder_images_and_labels(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a class-folder tree (uint8 (N, H, W, 3)) with its class index."""
    from rae_cli.data import open_rgb, scan_image_folder

    data = scan_image_folder(root)
    images = np.stack([np.asarray(open_rgb(f), dtype=np.uint8) for f in data.files])
    return images, np.asarray(data.labels, dtype=np.int64)


def diversity_ratio(gen: np.ndarray, gen_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray
                    ) -> tuple[float, dict[str, float]]:
    """Mean over classes of (mean pairwise distance of generated features) / (the same of real features).

    Classes with fewer than two generated or real samples are left out; (nan, {}) if none is left.
    """
    from scipy.spatial.distance import pdist

    per_class = {}
    for c in np.unique(gen_labels):
        g, r = gen[gen_labels == c], real[real_labels == c]
        if len(g) >= 2 and len(r) >= 2:
            per_class[str(int(c))] = float(pdist(g).mean() / pdist(r).mean())
    return (float(np.mean(list(per_class.values()))) if per_class else float("nan")), per_class


def same_size_floor(real_a: np.ndarray, real_b: np.ndarray, n: int, repeats: int = 3, seed: int = 0) -> float:
    """Fréchet distance of ``n`` random rows of ``real_a`` to all of ``real_b``, averaged over ``repeats`` draws.

    What two real sets score at the sample count being judged: with few samples the covariance estimate alone adds
    a large bias (on the digits, 100 real images score ≈ 87 against the test split; all 1,438 score ≈ 34)."""
    from rae_cli.fid import frechet_distance, statistics_from_features

    rng = np.random.default_rng(seed)
    stats_b = statistics_from_features(real_b)
    return float(np.mean([frechet_distance(*statistics_from_features(real_a[rng.choice(len(real_a), n, replace=False)]),
                                           *stats_b) for _ in range(repeats)]))


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
    from rae_cli.fid import extract_features, frechet_distance, get_extractor, statistics_from_features
    from rae_cli.npz import load_images_array
    from rae_cli.toy_data import fit_digit_classifier, fit_digit_mlp, mlp_hidden_features, to_digit_features

    samples_dir = Path(samples_dir)
    images, labels = _sample_images_and_labels(samples_dir)
    clf = fit_digit_classifier()
    pred = clf.predict(to_digit_features(images))
    correct = pred == labels
    per_class_acc = {str(c): float(correct[labels == c].mean()) for c in np.unique(labels)}

    extractor = get_extractor("efficientnet-lite0", device=device)
    real, real_labels = _folder_images_and_labels(Path(real_dir))
    feat_g, feat_r = extract_features(images, extractor).pool, extract_features(real, extractor).pool
    mu_g, sig_g = statistics_from_features(feat_g)
    mu_r, sig_r = statistics_from_features(feat_r)
    judge = fit_digit_mlp()
    judge_g = mlp_hidden_features(judge, to_digit_features(images))
    judge_r = mlp_hidden_features(judge, to_digit_features(real))
    diversity, diversity_per_class = diversity_ratio(feat_g, labels, feat_r, real_labels)
    metrics: dict = {
        "sample_class_accuracy": float(correct.mean()),
        "sample_class_accuracy_per_class": per_class_acc,
        "num_samples": int(len(images)),
        "frechet_distance": frechet_distance(mu_g, sig_g, mu_r, sig_r),
        "frechet_distance_features": extractor.name + " (offline; not FID)",
        "num_real": int(len(real)),
        "frechet_distance_digits_mlp": frechet_distance(*statistics_from_features(judge_g),
                                                        *statistics_from_features(judge_r)),
        "frechet_distance_digits_mlp_features": "hidden layer (64) of an MLP trained on the digits train split only; "
                                                "independent of the RAE encoder (offline; not FID)",
        "sample_diversity_ratio": diversity,
        "sample_diversity_ratio_per_class": diversity_per_class,
        "sample_diversity_ratio_features": extractor.name,
        "sample_diversity_ratio_digits_mlp": diversity_ratio(judge_g, labels, judge_r, real_labels)[0],
    }
    if real_train_dir is not None:
        train_images = load_images_array(real_train_dir)
        feat_t = extract_features(train_images, extractor).pool
        mu_t, sig_t = statistics_from_features(feat_t)
        metrics["frechet_distance_real_train_vs_test"] = frechet_distance(mu_t, sig_t, mu_r, sig_r)
        if len(train_images) > len(images):
            # The distance grows as the sample shrinks (covariance from few points): the floor at this many samples
            metrics["frechet_distance_real_floor_same_n"] = same_size_floor(feat_t, feat_r, len(images))
        judge_t = mlp_hidden_features(judge, to_digit_features(train_images))
        metrics["frechet_distance_digits_mlp_real_train_vs_test"] = frechet_distance(
            *statistics_from_features(judge_t), *statistics_from_features(judge_r))
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
