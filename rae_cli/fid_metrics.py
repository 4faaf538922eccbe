"""The generation metrics of :mod:`rae_cli.fid` on extracted features: Fréchet distance, Inception Score and
k-NN precision/recall."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

log = logging.getLogger("rae_cli.fid")  # the name these messages always had


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
