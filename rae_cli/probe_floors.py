"""The two floors of the overfit probe (paper §4.1, Theorem 1): the paper's bound and the exact one for one latent."""

from __future__ import annotations

import torch


def paper_bound(n: int, d: int) -> float:
    """Theorem 1's lower bound on the single-image loss: max(0, (n − d)/n)."""
    return max(0.0, (n - d) / n)


def exact_floor(latent: torch.Tensor, d: int) -> float:
    """The smallest loss any model whose output tokens lie in a d-dim affine subspace can reach on this latent.

    The model's last layer is Linear(d → n) with a bias, so every output token lies in S = b + span(Q), Q ∈ R^{n×d}
    orthonormal, whatever comes before it. latent: (n, h, w), one data point X with N = h·w tokens X_i ∈ R^n. Given
    t > 0 and x_t = (1 − t)·X + t·ε the noise ε is determined, so the best a model can do is the orthogonal
    projection of each target y_i = ε_i − X_i onto S, at every t alike. The loss is

        E Σ_i ‖P⊥(ε_i − X_i − b)‖² / (N·n) = [N·(n − d) + Σ_i ‖P⊥(X_i + b)‖²] / (N·n),

    the cross term vanishing since E ε = 0. The noise part does not depend on Q (ε is isotropic), so the best S fits
    the data: −b = the token mean (the bias is free, so all d directions go to the centred tokens) and Q = their top-d
    principal directions, leaving R_d = the sum of all but the d largest eigenvalues of Σ_i (X_i − X̄)(X_i − X̄)ᵀ:

        floor = max(0, n − d)/n + R_d / (N·n).

    The centred tokens span at most N − 1 dimensions, so R_d = 0 and the floor equals the paper's bound once
    d ≥ N − 1 (e.g. N = 256 tokens at 256²); with few tokens and small d it is higher.
    """
    return exact_floors(latent, [d])[0]


def exact_floors(latent: torch.Tensor, widths) -> list[float]:
    """:func:`exact_floor` for several widths from one eigen-decomposition."""
    if latent.dim() != 3:
        raise ValueError(f"expected one latent (n, h, w), got shape {tuple(latent.shape)}")
    n = latent.shape[0]
    tokens = latent.detach().reshape(n, -1).T.double().cpu()  # (N, n)
    N = tokens.shape[0]
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    # Eigenvalues of the centred scatter matrix, from the smaller of the two Gram matrices (same nonzero spectrum).
    gram = centred @ centred.T if N <= n else centred.T @ centred
    eig = torch.linalg.eigvalsh(gram).flip(0)  # descending
    eig = torch.where(eig > 1e-12 * eig[0].clamp(min=1e-300), eig, torch.zeros_like(eig))  # round-off → exact 0
    tail = torch.cat([eig.flip(0).cumsum(0).flip(0), eig.new_zeros(1)])  # tail[k] = Σ_{j ≥ k} eig[j] = R_k
    return [paper_bound(n, d) + float(tail[min(max(d, 0), len(eig))]) / (N * n) for d in widths]


# ----------------------------------------------------------------------------------------------------------------
# Latents and models

