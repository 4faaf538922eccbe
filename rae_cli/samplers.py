"""Samplers for the flow ODE / SDE (spec §4): the shifted time grid, Euler, Heun and Euler–Maruyama.

Time runs from t = 1 (noise) down to t ≈ 0 (data), see :mod:`rae_cli.flow`. ``model_fn(x, t) -> v`` takes times
of shape (B,) and returns the velocity; guidance lives in :mod:`rae_cli.guidance`, not here. Every sampler reports
its number of function evaluations (NFE) = calls of ``model_fn`` (a CFG ``model_fn`` may run a doubled batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rae_cli.flow import shift_time

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    samples: torch.Tensor  # (B, C, H, W): the state at the last grid point
    trajectory: torch.Tensor | None  # (N, B, C, H, W): the state at every grid point, index 0 = the input noise
    nfe: int  # calls of model_fn


def time_grid(num_steps: int, shift: float = 1.0, t0: float = 0.0, t1: float = 0.999,
              to_zero: bool = False) -> torch.Tensor:
    """The official grid shift(1 − linspace(t0, t1, N)) in fp32: N points = N − 1 steps, from 1 down to shift(0.001).

    ``num_steps`` counts grid **points** (official semantics: 50 → 49 Euler steps). With ``to_zero`` the grid is
    shift(1 − linspace(t0, 1, N)), whose last point is exactly 0 (a final step all the way to the data).
    """
    if num_steps < 2:
        raise ValueError(f"a time grid needs at least 2 points (1 step), got num_steps={num_steps}")
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    grid = shift_time(1 - torch.linspace(t0, 1.0 if to_zero else t1, num_steps), shift)
    if to_zero:
        grid[-1] = 0.0
    return grid


def _times(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scalar grid time → (B,) on x's device; fp32 unless x is fp64 (never bf16: t feeds a Fourier embedding)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return t.to(device=x.device, dtype=dtype).expand(x.shape[0]).clone()


def _check(z: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")
    return grid.to(z.device)


def euler(model_fn: ModelFn, z: torch.Tensor, grid: torch.Tensor, return_trajectory: bool = False) -> SampleResult:
    """Explicit Euler: x ← x + (t_next − t)·v(x, t). One NFE per step (torchdiffeq ``euler`` on a fixed grid)."""
    grid = _check(z, grid)
    x, traj, nfe = z, [z], 0
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        v = model_fn(x, _times(t_cur, x))
        nfe += 1
        x = x + (t_next - t_cur) * v
        if return_trajectory:
            traj.append(x)
    return SampleResult(x, torch.stack(traj) if return_trajectory else None, nfe)


def heun(model_fn: ModelFn, z: torch.Tensor, grid: torch.Tensor, return_trajectory: bool = False) -> SampleResult:
    """Heun / explicit trapezoid (torchdiffeq ``heun2``): k1 = v(x, t), k2 = v(x + Δ·k1, t_next),
    x ← x + Δ·(k1 + k2)/2 with Δ = t_next − t. Two NFE on every step, the last one included."""
    grid = _check(z, grid)
    x, traj, nfe = z, [z], 0
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        k1 = model_fn(x, _times(t_cur, x))
        k2 = model_fn(x + dt * k1, _times(t_next, x))
        nfe += 2
        x = x + (0.5 * dt) * k1 + (0.5 * dt) * k2
        if return_trajectory:
            traj.append(x)
    return SampleResult(x, torch.stack(traj) if return_trajectory else None, nfe)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """ξ ~ N(0, I) shaped like x: from one generator, or row i from ``generator[i]`` (one stream per image, so an
    image's noise does not depend on its batch-mates: row i equals a batch-of-one draw from the same generator)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def euler_maruyama(model_fn: ModelFn, z: torch.Tensor, grid: torch.Tensor, *, diffusion_scale: float = 1.0,
                   generator=None, return_trajectory: bool = False) -> SampleResult:
    """Euler–Maruyama for the reverse SDE with the same marginals as the flow ODE, diffusion w(t) = scale·t.

    With Δ = t − t_next > 0:  x ← x − (v − w·∇log p)·Δ + sqrt(2·w·Δ)·ξ,  ξ ~ N(0, I).
    The score follows from the velocity: ∇log p = −(x + (1 − t)·v)/t (= −E[ε|x_t]/t), so
    w·∇log p = −scale·(x + (1 − t)·v) stays finite at t → 0 (unlike the official "SBDM" form, which gives NaN).
    The last step is deterministic (the mean of the update, no noise), so a grid ending at 0 returns clean data.
    ``generator`` (on z's device, or None) draws the noise; a list of generators gives row i its own stream
    (batched sampling with one noise stream per image). One NFE per step; scale 0 is Euler on the ODE.
    """
    if diffusion_scale < 0:
        raise ValueError(f"diffusion_scale must be >= 0, got {diffusion_scale}")
    grid = _check(z, grid)
    x, traj, nfe = z, [z], 0
    n_steps = grid.numel() - 1
    for k, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = model_fn(x, _times(t_cur, x))
        nfe += 1
        w_score = -diffusion_scale * (x + (1 - t_cur) * v)  # w(t)·∇log p_t(x)
        step = t_cur - t_next  # Δ > 0
        x = x - (v - w_score) * step
        if k < n_steps - 1:
            noise = _noise_like(x, generator)
            x = x + torch.sqrt(2 * diffusion_scale * t_cur * step).to(x.dtype) * noise
        if return_trajectory:
            traj.append(x)
    return SampleResult(x, torch.stack(traj) if return_trajectory else None, nfe)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {"euler": euler, "heun": heun, "sde": euler_maruyama}


def sample(method: str, model_fn: ModelFn, z: torch.Tensor, *, num_steps: int, shift: float = 1.0,
           t1: float = 0.999, to_zero: bool = False, return_trajectory: bool = False,
           generator=None, diffusion_scale: float = 1.0) -> SampleResult:
    """Integrate from noise ``z`` over :func:`time_grid` (``num_steps`` points) with ``method``: euler | heun | sde."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    grid = time_grid(num_steps, shift, t1=t1, to_zero=to_zero)
    if method == "sde":
        return euler_maruyama(model_fn, z, grid, diffusion_scale=diffusion_scale, generator=generator,
                              return_trajectory=return_trajectory)
    return SAMPLERS[method](model_fn, z, grid, return_trajectory=return_trajectory)


def expected_nfe(method: str, num_steps: int) -> int:
    """NFE of ``method`` on a grid of ``num_steps`` points (without guidance); meanflow: num_steps jumps."""
    if method == "meanflow":
        return num_steps
    steps = num_steps - 1
    return 2 * steps if method == "heun" else steps


__all__ = ["SampleResult", "time_grid", "euler", "heun", "euler_maruyama", "sample", "SAMPLERS", "expected_nfe",
           "ModelFn"]
