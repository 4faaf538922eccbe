"""Generation metrics on Inception features (spec §7): FID, Inception Score, precision/recall, cached reference stats.

Features come from torch-fidelity's port of the TF 2015 Inception graph ('inception-v3-compat': 2048-d pool and
1008 unbiased logits), the network the official online eval uses; the official gFID numbers come from ADM's TF
evaluator, so ours are close to, not bit-identical with, the paper's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rae_cli import npz
from rae_cli.checkpoint import CheckpointError, torch_load_weights
from rae_cli.data import list_images
from rae_cli.errors import DataError
from rae_cli.npz import ReferenceStats
from rae_cli.weights import WeightsNotFoundError, get_artifact, rae_home, resolve

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = get_artifact("fid-inception").hub_filename  # weights-inception-2015-12-05-6726825d.pth
METRICS = ("fid", "is", "pr")

# What evaluate() accepts for a set of images: a folder / npz path, a uint8 (N, H, W, 3) array, or batches of them.
Images = Union[str, os.PathLike, np.ndarray, torch.Tensor, Iterable[np.ndarray]]


# ------------------------------------------------------------------------------------------ feature extractors


class FeatureExtractor(Protocol):
    """Maps uint8 (B, H, W, 3) images to ``{"pool": (B, D) float32, "logits": (B, K) float32 or None}`` on the CPU.

    ``name`` identifies the network and its weights; it is part of the reference-statistics cache key.
    """

    name: str

    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]: ...


def _to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy → uint8 (B, 3, H, W) tensor on ``device``."""
    npz.check_images_array(images, "feature extractor input")
    if not images.flags.writeable:  # arrays streamed from an npz are read-only views; torch wants to own them
        images = images.copy()
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2)


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights_path`` if given, else artifact 'fid-inception' (torch hub checkpoints).

    Raises WeightsNotFoundError naming the file, where it goes and ``rae download fid-inception``.
    """
    if weights_path is None:
        return resolve("fid-inception")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"FID Inception weights not found at {path} (the path you gave). The file is {INCEPTION_WEIGHTS_FILE}; "
            "`rae download fid-inception` puts it in the torch hub checkpoints folder, where it is found by default.")
    return path


class InceptionFeatureExtractor:
    """torch-fidelity's FeatureExtractorInceptionV3 ('inception-v3-compat'): 2048-d pool + 1008 unbiased logits.

    It resizes to 299 itself (TF1-compatible bilinear) and wants uint8 input. We never let it download: the
    weights are read from disk with ``weights_only=True`` and handed over as an in-memory copy, because
    torch-fidelity would otherwise unpickle the file with ``weights_only=False``.
    """

    name = INCEPTION_NAME

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        path = inception_weights_path(weights_path)  # fail fast, before the slow torch-fidelity import
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        state_dict = torch_load_weights(path)  # plain tensors only, or CheckpointError
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)  # re-serialised from tensors we just loaded safely
        buffer.seek(0)
        try:
            model = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=buffer)
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatches
            raise CheckpointError(f"{path} is not the torch-fidelity Inception state dict: {e}") from e
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        pool, logits = self.model(_to_nchw(images, self.device))  # (B, 2048), (B, 1008)
        return {"pool": pool.float().cpu(), "logits": logits.float().cpu()}


class RandomConvFeatureExtractor(nn.Module):
    """TEST DOUBLE — a tiny randomly initialised CNN, for running the FID pipeline without Inception weights.

    Its numbers mean nothing beyond "same vs different distributions"; it is never used by default. Seeded, so
    two instances with the same arguments give identical features (and share a statistics cache entry).
    """

    def __init__(self, seed: int = 0, dim: int = 16, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.name = f"random-conv-test-double(seed={seed},dim={dim},classes={num_classes},size={image_size})"
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(dim, num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # He init (weights), zero biases: activations neither vanish nor explode
                if p.dim() == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
        self.eval()

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        x = _to_nchw(images, torch.device("cpu")).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        pool = self.body(x).mean(dim=(2, 3))  # (B, dim)
        return {"pool": pool, "logits": self.head(pool)}  # logits (B, num_classes)


class EfficientNetLite0FeatureExtractor(nn.Module):
    """Pretrained ImageNet EfficientNet-Lite0 (weights ship with a pip package, so it works offline).

    Not Inception: its Fréchet distance is **not FID** and is not comparable with published numbers. It is a real,
    pretrained feature space for small offline checks (the quickstart): images are resized (bilinear, antialias) to
    ``image_size``, ImageNet-normalised, and the 1280-d globally pooled pre-logit features and the 1000 logits are
    returned.
    """

    def __init__(self, image_size: int = 128, device: str | torch.device = "cpu"):
        super().__init__()
        from rae_cli.encoders import IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite0_classifier

        self.name = f"efficientnet-lite0-imagenet(size={image_size})"
        self.image_size = image_size
        self.device = torch.device(device)
        self.model = efficientnet_lite0_classifier().to(self.device).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(self.device))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(self.device))

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        x = _to_nchw(images, self.device).float() / 255.0  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        feats = self.model.forward_head(self.model.forward_features((x - self.mean) / self.std), pre_logits=True)
        return {"pool": feats.float().cpu(), "logits": self.model.get_classifier()(feats).float().cpu()}


FEATURE_EXTRACTORS = ("inception", "efficientnet-lite0")


def get_extractor(name: str = "inception", *, device: str | torch.device = "cpu",
                  inception_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """A pretrained feature network by name: ``inception`` (FID proper) or ``efficientnet-lite0`` (offline; its
    Fréchet distance is not FID). The random test double is chosen in :mod:`rae_cli.evaluate`, never here."""
    if name == "inception":
        return InceptionFeatureExtractor(weights_path=inception_weights, device=device)
    if name == "efficientnet-lite0":
        return EfficientNetLite0FeatureExtractor(device=device)
    raise DataError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")


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


# ------------------------------------------------------------------------------------------ the metrics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) in float64 (Heusel et al. 2017, eq. 6).

    scipy's ``sqrtm`` of a product of (near-)singular covariances can be non-finite; then both get ``eps·I``
    added (the pytorch-fid/ADM fallback). The result's tiny imaginary part (round-off) is dropped, as official.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 has shape {mu2.shape}, expected ({d},): the two sets use different features")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {s.shape}, expected ({d}, {d}) to match mu1")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled just below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            log.warning("FID: sqrtm(Σ1Σ2) is not finite (singular product); adding %g to the diagonals", eps)
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3:
            log.warning("FID: sqrtm has an imaginary component of %.3g; taking the real part", imag)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) ‖ p(y)) (Salimans et al. 2016), per split; returns (mean, std) over splits.

    Splits are consecutive slices of sizes N·k/splits, the marginal p(y) is the mean within each split.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score needs 1 ≤ splits ≤ N, got splits={splits}, N={n}")
    log_p = torch.log_softmax(logits, dim=1)  # (N, K); log-space so confident (one-hot) rows stay finite
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits:(k + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))  # log mean_x p(y|x), (K,)
        p = part.exp()
        # p·log(p/marginal) with 0·log 0 = 0: classes no image predicts must not turn the sum into NaN
        kl = torch.where(p > 0, p * (part - log_marginal), torch.zeros_like(p)).sum(dim=1)  # (n_k,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point in the same set. (N,)"""
    radii = torch.empty(len(feats), dtype=feats.dtype, device=feats.device)
    for start in range(0, len(feats), chunk):
        dist = torch.cdist(feats[start:start + chunk], feats)  # (c, N)
        radii[start:start + chunk] = dist.kthvalue(k + 1, dim=1).values  # k + 1: the point itself is at 0
    return radii


def _inside_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each query, whether it lies in some support point's k-NN ball. (M,) bool"""
    inside = torch.empty(len(queries), dtype=torch.bool, device=queries.device)
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk], support)  # (c, N)
        inside[start:start + chunk] = (dist <= radii[None, :]).any(dim=1)
    return inside


def precision_recall(real_feats: np.ndarray | torch.Tensor, fake_feats: np.ndarray | torch.Tensor, k: int = 3,
                     *, chunk: int = 1024, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates.

    precision: fraction of fakes inside the real manifold (union of balls reaching each real's k-th real NN);
    recall: fraction of reals inside the fake manifold. Distances in chunks of ``chunk`` rows.
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k, chunk), chunk).float().mean().item()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k, chunk), chunk).float().mean().item()
    return precision, recall


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
