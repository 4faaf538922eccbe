"""Embedded datasets that need no download: scikit-learn's 8×8 digits (1,797 labelled images, 10 classes).

``export_digits`` writes them as an ImageFolder (``train/<digit>/*.png``, ``test/<digit>/*.png``) upsampled to a size an
encoder can read, so every ``rae`` command runs on them unchanged. The split is fixed (seeded) and stratified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rae_cli.errors import DataError

DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float in [0, 1], shape (1797, 8, 8); labels int (1797,)) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataError("the digits dataset needs scikit-learn: pip install 'rae-cli[quickstart]'") from e
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: the same ``test_fraction`` of every class goes to the test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) in [0, 1] → (N, size, size, 3) uint8, bicubic, white digits on black (as scikit-learn draws them)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(np.clip(im * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        big = np.asarray(pil.resize((size, size), resample=Image.BICUBIC))
        out[i] = big[..., None]
    return out


def export_digits(out_dir: str | Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write ``train/`` and ``test/`` class folders of PNGs; returns counts. Re-running overwrites identically."""
    from PIL import Image

    from rae_cli.checkpoint import atomic_path
    from rae_cli.errors import DataError

    if size < 8:
        raise DataError(f"--size {size}: the digits are 8×8 and are upsampled, so the size must be ≥ 8 (e.g. 32)")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction {test_fraction}: must be in [0, 1) (the share of each class held out for "
                        "test/; the rest is train/)")
    images, labels = load_digits_arrays()
    train, test = split_indices(labels, test_fraction, seed)
    big = upsample(images, size)
    out_dir = Path(out_dir)
    counts = {}
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            path = out_dir / split / DIGITS_CLASSES[labels[i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, durable=False) as tmp:  # 1,797 small files; a rerun rewrites them identically
                Image.fromarray(big[i]).save(tmp, format="PNG")
        counts[split] = int(len(idx))
    return counts


def fit_digit_classifier(seed: int = 0):
    """A scikit-learn classifier of the 8×8 digits, trained on the quickstart train split only."""
    from sklearn.linear_model import LogisticRegression

    images, labels = load_digits_arrays()
    train, _ = split_indices(labels, 0.2, seed)
    clf = LogisticRegression(max_iter=2000)
    clf.fit(images[train].reshape(len(train), -1), labels[train])
    return clf


def to_digit_features(images_u8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 64) in [0, 1]: grey, area-downsampled to 8×8 like the classifier's inputs."""
    from PIL import Image

    out = np.empty((len(images_u8), 64), dtype=np.float32)
    for i, im in enumerate(images_u8):
        grey = Image.fromarray(im).convert("L").resize((8, 8), resample=Image.BOX)
        out[i] = np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0
    return out


def fit_digit_mlp(seed: int = 0):
    """An MLP (64 → 64 ReLU → 10) on the 8×8 digits of the quickstart train split only: the quickstart's independent
    judge. Its hidden layer is a feature space that shares nothing with the RAE's encoder network."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    images, labels = load_digits_arrays()
    train, _ = split_indices(labels, 0.2, seed)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(images[train].reshape(len(train), -1), labels[train])
    return clf


def mlp_hidden_features(clf, features: np.ndarray) -> np.ndarray:
    """The hidden-layer activations (N, 64) of :func:`fit_digit_mlp` for (N, 64) inputs from :func:`to_digit_features`."""
    return np.maximum(features @ clf.coefs_[0] + clf.intercepts_[0], 0.0).astype(np.float64)

