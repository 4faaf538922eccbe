"""Generation metrics on Inception features (spec §7): FID, Inception Score, precision/recall, cached reference stats.

Features come from torch-fidelity's port of the TF 2015 Inception graph ('inception-v3-compat': 2048-d pool and
1008 unbiased logits), the network the official online eval uses; the official gFID numbers come from ADM's TF
evaluator, so ours are close to, not bit-identical with, the paper's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from rae_cli import npz
from rae_cli.data import list_images
from rae_cli.errors import DataError
# The feature networks and the metrics live in rae_cli.fid_extractors and rae_cli.fid_metrics; their names are
# re-exported here, where they always were.
from rae_cli.fid_extractors import (  # noqa: F401
    FEATURE_EXTRACTORS, INCEPTION_NAME, INCEPTION_WEIGHTS_FILE, EfficientNetLite0FeatureExtractor, FeatureExtractor,
    InceptionFeatureExtractor, RandomConvFeatureExtractor, _to_nchw, get_extractor, inception_weights_path)
from rae_cli.fid_metrics import (  # noqa: F401
    _inside_manifold, _kth_neighbour_radii, frechet_distance, inception_score, precision_recall)
from rae_cli.npz import ReferenceStats
from rae_cli.weights import WeightsNotFoundError, rae_home  # noqa: F401

log = logging.getLogger(__name__)

METRICS = ("fid", "is", "pr")

# What evaluate() accepts for a set of images: a folder / npz path, a uint8 (N, H, W, 3) array, or batches of them.
Images = Union[str, os.PathLike, np.ndarray, torch.Tensor, Iterable[np.ndarray]]


# ------------------------------------------------------------------------------------------ feature extraction


@dataclass(frozen=True)
class Features:
    pool: np.ndarray  # (N, D) float32
    logits: np.ndarray | None  # (N, K) float32, or None if the extractor has no classifier


def _batches(images: Images, batch_size: int) -> Iterator[np.ndarray]:
    """Uint8 (b, H, W, 3) numpy batches of at most ``batch_size`` from any accepted input."""
    if isinstance(images, (str, os.PathLike)):
        yield from npz.iter_image_batches(images, batch_size)
        return
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    for chunk in images:
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu().numpy()
        npz.check_images_array(chunk, "images")
        for start in range(0, len(chunk), batch_size):
            yield chunk[start:start + batch_size]


def extract_features(images: Images, extractor: FeatureExtractor, batch_size: int = 50) -> Features:
    """Run ``extractor`` over every image; pool features and logits stacked in input order."""
    pools, logits, n = [], [], 0
    for i, batch in enumerate(_batches(images, batch_size)):
        out = extractor.features(batch)
        pools.append(out["pool"].numpy())
        if out.get("logits") is not None:
            logits.append(out["logits"].numpy())
        n += len(batch)
        if (i + 1) % 20 == 0:
            log.info("%s features: %d images", extractor.name, n)
    if not pools:
        raise DataError("no images to extract features from")
    return Features(pool=np.concatenate(pools), logits=np.concatenate(logits) if logits else None)


def statistics_from_features(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D, D) in float64; sigma is ``np.cov(rowvar=False)`` (unbiased, N − 1), as official."""
    if len(pool) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(pool)}")
    pool = pool.astype(np.float64)
    return pool.mean(axis=0), np.cov(pool, rowvar=False)


def compute_statistics(images: Images, extractor: FeatureExtractor, batch_size: int = 50
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fréchet statistics (mu, sigma) of the pool features of ``images``."""
    return statistics_from_features(extract_features(images, extractor, batch_size).pool)


# ------------------------------------------------------------------------------------------ reference cache


def default_cache_dir() -> Path:
    """``$RAE_HOME/fid-stats`` (default ``~/.cache/rae/fid-stats``), beside the toolkit's downloaded weights."""
    return rae_home() / "fid-stats"


def cache_key(path: str | os.PathLike, extractor_name: str) -> str:
    """sha1 of (absolute path, total size, newest mtime, file count, extractor name): changes when the data does."""
    path = Path(path).resolve()
    if path.is_dir():
        stats = [f.stat() for f in list_images(path)]
        size, mtime, count = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats), len(stats)
    else:
        st = path.stat()
        size, mtime, count = st.st_size, st.st_mtime_ns, 1
    return hashlib.sha1(f"{path}|{size}|{mtime}|{count}|{extractor_name}".encode()).hexdigest()


def image_statistics(path: str | os.PathLike, extractor: FeatureExtractor, cache_dir: str | os.PathLike | None,
                     batch_size: int = 50) -> ReferenceStats:
    """mu/sigma/features of the images at ``path``, read from ``<cache_dir>/<cache_key>.npz`` or computed and stored."""
    cache_file = Path(cache_dir) / f"{cache_key(path, extractor.name)}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = npz.read_stats(cache_file)
        if cached is not None and cached.features is not None and cached.extractor == extractor.name:
            log.info("reference statistics for %s from cache %s", path, cache_file)
            return cached
    feats = extract_features(path, extractor, batch_size).pool
    mu, sigma = statistics_from_features(feats)
    stats = ReferenceStats(mu=mu, sigma=sigma, features=feats, num_images=len(feats), extractor=extractor.name)
    if cache_file is not None:
        npz.save_reference_stats(cache_file, stats)
        log.info("cached reference statistics for %s in %s", path, cache_file)
    return stats


def reference_statistics(path: str | os.PathLike, extractor: FeatureExtractor,
                         cache_dir: str | os.PathLike | None = None, *, batch_size: int = 50,
                         need_features: bool = False) -> ReferenceStats:
    """Reference statistics for ``path``: an ADM-style npz's own ``mu``/``sigma``, or those of its images (cached).

    Like ADM's evaluator, a file that stores ``mu``/``sigma`` is used as is for FID; with ``need_features`` its
    ``arr_0`` images (if any) are also run through ``extractor`` for precision/recall. ``features`` is None when
    they cannot be had.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"reference not found: {path}")
    stored = npz.read_stats(path)
    if stored is None:
        return image_statistics(path, extractor, cache_dir, batch_size)
    if stored.extractor is not None and stored.extractor != extractor.name:
        raise DataError(f"{path} holds statistics of '{stored.extractor}' features, not '{extractor.name}'")
    if need_features and stored.features is None and npz.has_images(path):
        stored = replace(stored, features=image_statistics(path, extractor, cache_dir, batch_size).features)
    return stored


# ------------------------------------------------------------------------------------------ one call


def evaluate(generated: Images, reference: Images | None, *, extractor: FeatureExtractor | None = None,
             batch_size: int = 50, cache_dir: str | os.PathLike | None = None,
             metrics: Sequence[str] = METRICS, pr_k: int = 3, is_splits: int = 10,
             device: str | torch.device | None = None,
             inception_weights: str | os.PathLike | None = None) -> dict:
    """FID / Inception Score / precision-recall of ``generated`` against ``reference``, as a JSON-able dict.

    ``generated``, ``reference``: a folder or npz path, or uint8 (N, H, W, 3) images. A reference npz with
    ``mu``/``sigma`` (ADM reference batch) is used as is for FID. Path references are cached in ``cache_dir``
    (None: no cache; see :func:`default_cache_dir`). ``extractor`` defaults to the Inception network (weights from
    ``inception_weights`` or the torch hub cache) on ``device`` (default: CUDA when available). Keys: extractor, num_generated, num_reference, and per metric
    fid; inception_score_mean, inception_score_std; precision, recall (None when the reference has no images).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; valid: {', '.join(METRICS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if extractor is None:
        extractor = InceptionFeatureExtractor(inception_weights, device=device)
    gen = extract_features(generated, extractor, batch_size)
    result: dict = {"extractor": extractor.name, "num_generated": len(gen.pool), "num_reference": None}

    if "is" in metrics:
        if gen.logits is None:
            raise DataError(f"the '{extractor.name}' extractor gives no logits; the Inception Score needs them")
        splits = min(is_splits, len(gen.logits))
        if splits < is_splits:
            log.warning("only %d generated images: Inception Score over %d splits, not %d", splits, splits, is_splits)
        result["inception_score_mean"], result["inception_score_std"] = inception_score(gen.logits, splits)

    if "fid" in metrics or "pr" in metrics:
        if reference is None:
            raise DataError("FID and precision/recall need a reference (a folder, npz or image array)")
        if isinstance(reference, (str, os.PathLike)):
            ref = reference_statistics(reference, extractor, cache_dir, batch_size=batch_size,
                                       need_features="pr" in metrics)
        else:
            feats = extract_features(reference, extractor, batch_size).pool
            mu, sigma = statistics_from_features(feats)
            ref = ReferenceStats(mu=mu, sigma=sigma, features=feats, num_images=len(feats), extractor=extractor.name)
        result["num_reference"] = ref.num_images
        if "fid" in metrics:
            if ref.mu.shape[0] != gen.pool.shape[1]:
                raise DataError(f"reference statistics are {ref.mu.shape[0]}-d but '{extractor.name}' gives "
                                 f"{gen.pool.shape[1]}-d features (ADM reference batches need {INCEPTION_NAME})")
            mu, sigma = statistics_from_features(gen.pool)
            result["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
        if "pr" in metrics:
            if ref.features is None:
                log.warning("reference %s has statistics but no images: precision/recall not computed", reference)
                result["precision"] = result["recall"] = None
            else:
                result["precision"], result["recall"] = precision_recall(ref.features, gen.pool, pr_k, device=device)
    return result
