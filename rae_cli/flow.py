"""Flow matching on RAE latents (spec §4): linear path, velocity target, time distributions, time shift.

Time convention, used everywhere in this package:
    t = 0 is data, t = 1 is noise;   x_t = (1 − t)·x_data + t·ε,   ε ~ N(0, I);
    the network predicts the velocity  u = dx_t/dt = ε − x_data;   sampling integrates from t = 1 down to t ≈ 0.
Times are shifted towards noise by s·t / (1 + (s − 1)·t) with s = sqrt(dim(latent) / 4096) ("dimension-dependent
shift" of the paper), applied both to training times and to the sampler's grid.

All functions are pure; randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Mapping, Sequence

import torch

TimeDist = Literal["uniform", "logit-normal"]


def shift_time(t, shift: float):
    """s·t / (1 + (s − 1)·t): maps [0, 1] onto itself (0 → 0, 1 → 1) and pushes t towards noise when s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def shift_from_shape(latent_shape: Sequence[int], base: int = 4096) -> float:
    """s = sqrt(prod(latent_shape) / base); [768, 16, 16] → sqrt(48) ≈ 6.93, [768, 32, 32] → sqrt(192)."""
    dim = math.prod(int(d) for d in latent_shape)
    if dim <= 0 or base <= 0:
        raise ValueError(f"latent shape {tuple(latent_shape)} and base {base} must be positive")
    return math.sqrt(dim / base)


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (x.dim() - 1))  # (B,) → (B, 1, …, 1)


def interpolate(x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x_data + t·ε, with t of shape (B,)."""
    t = _per_sample(t, x_data)
    return (1 - t) * x_data + t * noise


def velocity_target(x_data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u = dx_t/dt = ε − x_data (independent of t for the linear path)."""
    return noise - x_data


def logit_normal_from_uniform(u: torch.Tensor, mu: float = 0.0, sigma: float = 1.0, t0: float = 0.0,
                              t1: float = 0.999) -> torch.Tensor:
    """Inverse-CDF map of uniforms u ∈ [0, 1] to a logit-normal truncated to [t0, t1]:

    t = sigmoid(μ + σ·Φ⁻¹(Φ(α) + (Φ(β) − Φ(α))·u)),  α = (logit(t0) − μ)/σ,  β = (logit(t1) − μ)/σ,
    computed in fp32 like the official sampler, then clamped to [t0, t1].
    """
    if sigma <= 0:
        raise ValueError(f"logit-normal sigma must be > 0, got {sigma}")
    lo = torch.tensor(t0, dtype=torch.float32, device=u.device)
    hi = torch.tensor(t1, dtype=torch.float32, device=u.device)
    alpha = (torch.logit(lo) - mu) / sigma  # −inf when t0 = 0
    beta = (torch.logit(hi) - mu) / sigma  # +inf when t1 = 1

    def std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))

    cdf_a, cdf_b = std_normal_cdf(alpha), std_normal_cdf(beta)
    p = cdf_a + (cdf_b - cdf_a) * u.float().clamp(0, 1)
    z = mu + sigma * (torch.erfinv(2 * p - 1) * math.sqrt(2))  # Φ⁻¹(p)
    return torch.sigmoid(z).clamp(lo, hi)


def sample_time(batch: int, kind: TimeDist = "uniform", *, mu: float = 0.0, sigma: float = 1.0, t0: float = 0.0,
                t1: float = 0.999, shift: float = 1.0, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Training times (B,) fp32: U(t0, t1) or a truncated logit-normal(μ, σ) on [t0, t1], then shifted by ``shift``.

    One ``rand(B)`` draw either way (on the generator's device, then moved to ``device``), as the official code.
    """
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    draw_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(batch, generator=generator, device=draw_device)
    if kind == "uniform":
        t = u * (t1 - t0) + t0
    elif kind == "logit-normal":
        t = logit_normal_from_uniform(u, mu, sigma, t0, t1)
    else:
        raise ValueError(f"unknown time distribution {kind!r}; use 'uniform' or 'logit-normal'")
    if device is not None:
        t = t.to(device)
    return shift_time(t, shift)


def draw_noise_and_time(x_data: torch.Tensor, *, kind: TimeDist = "uniform", mu: float = 0.0, sigma: float = 1.0,
                        t0: float = 0.0, t1: float = 0.999, shift: float = 1.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, t) for a training batch, drawn in the official order: ε = randn_like(x_data) first, then t.

    ε is drawn on x_data's device (``generator`` must live there too, or be None); t follows :func:`sample_time`.
    """
    noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
    t = sample_time(x_data.shape[0], kind, mu=mu, sigma=sigma, t0=t0, t1=t1, shift=shift, generator=generator,
                    device=x_data.device)
    if x_data.dtype == torch.float64:
        t = t.double()  # keep fp32 times for fp32/bf16 latents (the official code casts t to bf16 under bf16)
    return noise, t


def training_loss(model_fn: Callable[..., torch.Tensor], x_data: torch.Tensor,
                  model_kwargs: Mapping | None = None, *, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss (B,): mean over (C, H, W) of (v_θ(x_t, t, **kwargs) − (ε − x_data))², in fp32.

    The training objective is its batch mean; no loss weighting (the official ``loss_weight: null``).
    """
    if noise.shape != x_data.shape or t.shape != x_data.shape[:1]:
        raise ValueError(f"shapes do not match: x_data {tuple(x_data.shape)}, noise {tuple(noise.shape)}, "
                         f"t {tuple(t.shape)}")
    x_t = interpolate(x_data, noise, t)
    pred = model_fn(x_t, t, **(model_kwargs or {}))
    err = (pred.float() - velocity_target(x_data, noise).float()) ** 2
    return err.flatten(1).mean(dim=1)


def sample_training_loss(model_fn: Callable[..., torch.Tensor], x_data: torch.Tensor,
                         model_kwargs: Mapping | None = None, *, generator: torch.Generator | None = None,
                         kind: TimeDist = "logit-normal", mu: float = 0.0, sigma: float = 1.0, t0: float = 0.0,
                         t1: float = 0.999, shift: float = 1.0) -> torch.Tensor:
    """Draw (ε, t) from ``generator`` (official order) and return :func:`training_loss` (B,)."""
    noise, t = draw_noise_and_time(x_data, kind=kind, mu=mu, sigma=sigma, t0=t0, t1=t1, shift=shift,
                                   generator=generator)
    return training_loss(model_fn, x_data, model_kwargs, t=t, noise=noise)
