"""Samplers: the official time grid, Euler/Heun trajectories against torchdiffeq's, an SDE that stays finite,
convergence on a Gaussian whose exact velocity is known, and honest NFE counts."""

from __future__ import annotations

import math
import re

import pytest
import torch
from parity_fixtures import sub_state_dict

from rae_cli.checkpoint import strict_load
from rae_cli.dit import DiTDH
from rae_cli.flow import shift_time
from rae_cli.guidance import CountingModel, cfg, conditional
from rae_cli.samplers import euler, euler_maruyama, expected_nfe, heun, sample, time_grid


def _fixture_shift(meta) -> float:
    return float(str(meta["time_dist_shift"]).split("=")[-1])


@pytest.fixture(scope="module")
def transport(parity):
    tensors, meta = parity("transport")
    model = DiTDH(**meta["model_config"]).eval()
    strict_load(model, sub_state_dict(tensors, "state_dict."), "transport tiny model")
    return model, tensors, _fixture_shift(meta)


@pytest.fixture(scope="module")
def tiny():
    """An inline tiny DiT-DH with random non-zero weights, noise and labels (tests that need no official outputs)."""
    torch.manual_seed(0)
    model = DiTDH(input_size=4, patch_size=1, in_channels=8, hidden_size=[16, 32], depth=[1, 1], num_heads=[2, 2],
                  num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), torch.randn(2, 8, 4, 4, generator=g), torch.tensor([3, 7]), math.sqrt(8 * 4 * 4 / 4096)


def _gaussian_velocity(sigma: float):
    """Exact velocity for data N(0, σ²I): v = (t − (1 − t)σ²)/V_t · x with V_t = (1 − t)²σ² + t²."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        var = (1 - t) ** 2 * sigma**2 + t**2
        return (t - (1 - t) * sigma**2) / var * x
    return v


# ----------------------------------------------------------------------------------------------------------------
# Time grid


def test_time_grid_golden_values():
    """Spec §4 grid at s = √48: 1.0, 0.99701, 0.9939, …, 0.2320, 0.1315, 0.00689 (50 points, 49 steps)."""
    grid = time_grid(50, math.sqrt(48))
    assert grid.shape == (50,) and grid.dtype == torch.float32
    head = [1.0, 0.99701, 0.9939]
    tail = [0.49358, 0.4429, 0.38401, 0.31471, 0.23198, 0.13151, 0.00689]
    torch.testing.assert_close(grid[:3], torch.tensor(head), atol=1e-5, rtol=0)
    torch.testing.assert_close(grid[-7:], torch.tensor(tail), atol=1e-5, rtol=0)
    assert grid[-1].item() == pytest.approx(shift_time(0.001, math.sqrt(48)), rel=1e-4)
    assert (grid[1:] < grid[:-1]).all()


def test_time_grid_to_zero_and_errors():
    grid = time_grid(10, 3.0, to_zero=True)
    assert grid.shape == (10,) and grid[0] == 1.0 and grid[-1] == 0.0 and (grid[1:] < grid[:-1]).all()
    torch.testing.assert_close(grid, shift_time(1 - torch.linspace(0, 1, 10), 3.0))
    with pytest.raises(ValueError, match="at least 2"):
        time_grid(1)


def test_time_grid_parity(parity):
    tensors, _ = parity("transport")
    grids = [k for k in tensors if re.fullmatch(r"timeshift\.[^.]+\.ode_grid_\d+", k)]  # every shift and size
    assert grids
    for key in grids:
        s = tensors[key.rsplit(".", 1)[0] + ".shift"].item()
        n = int(key.rsplit("_", 1)[1])
        torch.testing.assert_close(time_grid(n, s), tensors[key], atol=1e-7, rtol=0, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# ODE parity with torchdiffeq (official Sampler.sample_ode)


def test_euler_10_trajectory_parity(transport):
    model, tensors, s = transport
    counted = CountingModel(model)
    with torch.no_grad():
        res = euler(conditional(counted, tensors["sample.y"]), tensors["sample.z"], time_grid(10, s),
                    return_trajectory=True)
    ref = tensors["sample.euler_10.trajectory"]
    assert res.trajectory.shape == ref.shape
    torch.testing.assert_close(res.trajectory, ref, atol=1e-5, rtol=0)
    assert torch.equal(res.samples, res.trajectory[-1])
    assert res.nfe == 9 == expected_nfe("euler", 10) and counted.calls == 9


def test_heun2_10_trajectory_parity(transport):
    model, tensors, s = transport
    counted = CountingModel(model)
    with torch.no_grad():
        res = heun(conditional(counted, tensors["sample.y"]), tensors["sample.z"], time_grid(10, s),
                   return_trajectory=True)
    torch.testing.assert_close(res.trajectory, tensors["sample.heun2_10.trajectory"], atol=1e-5, rtol=0)
    assert res.nfe == 18 == expected_nfe("heun", 10) and counted.calls == 18  # 2 per step, last step included


def test_euler_50_final_parity(transport):
    model, tensors, s = transport
    with torch.no_grad():
        res = sample("euler", conditional(model, tensors["sample.y"]), tensors["sample.z"], num_steps=50, shift=s)
    assert res.trajectory is None and res.nfe == 49
    torch.testing.assert_close(res.samples, tensors["sample.euler_50.final"], atol=1e-5, rtol=0)


def test_euler_50_cfg3_final_parity(transport):
    model, tensors, s = transport
    counted = CountingModel(model)
    y = tensors["sample.y"]
    with torch.no_grad():
        res = euler(cfg(counted, y, 3.0, t_min=0.0, t_max=1.0), tensors["sample.z"], time_grid(50, s))
    torch.testing.assert_close(res.samples, tensors["sample.euler_50_cfg3.final"], atol=1e-5, rtol=0)
    assert res.nfe == 49 and counted.batch_sizes == [2 * len(y)] * 49  # one doubled pass per step


# ----------------------------------------------------------------------------------------------------------------
# SDE


def test_sde_finite_on_tiny_model(tiny):
    model, z, y, s = tiny
    fn = conditional(model, y)
    for to_zero in (False, True):
        with torch.no_grad():
            res = euler_maruyama(fn, z, time_grid(30, s, to_zero=to_zero),
                                 generator=torch.Generator().manual_seed(0), return_trajectory=True)
        assert torch.isfinite(res.trajectory).all() and res.nfe == 29
        assert res.trajectory.shape == (30, *z.shape)


def test_sde_reproducible_and_zero_diffusion_is_euler(tiny):
    model, z, y, s = tiny
    fn, grid = conditional(model, y), time_grid(12, s)
    with torch.no_grad():
        a = euler_maruyama(fn, z, grid, generator=torch.Generator().manual_seed(3)).samples
        b = euler_maruyama(fn, z, grid, generator=torch.Generator().manual_seed(3)).samples
        c = euler_maruyama(fn, z, grid, generator=torch.Generator().manual_seed(4)).samples
        ode = euler_maruyama(fn, z, grid, diffusion_scale=0.0).samples
        eul = euler(fn, z, grid).samples
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(ode, eul, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="diffusion_scale"):
        euler_maruyama(fn, z, grid, diffusion_scale=-1.0)


def test_sde_preserves_the_gaussian_marginal():
    """With the exact velocity of N(0, σ²), the SDE ends at data with std σ (and differs from the ODE path)."""
    sigma = 0.5
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = time_grid(100, to_zero=True).double()
    res = euler_maruyama(_gaussian_velocity(sigma), z, grid, generator=torch.Generator().manual_seed(1))
    assert res.samples.std().item() == pytest.approx(sigma, abs=0.01)
    assert abs(res.samples.mean().item()) < 0.015
    ode = euler(_gaussian_velocity(sigma), z, grid).samples
    assert (ode - res.samples).abs().mean() > 0.05  # the noise really changes the path


# ----------------------------------------------------------------------------------------------------------------
# Convergence orders on an exactly solvable flow


def test_ode_convergence_orders():
    """For N(0, σ²) data the flow is x_t = sqrt(V_t)·x_1: Euler error halves with 2× steps, Heun's quarters."""
    sigma, s = 0.5, 1.0
    v = _gaussian_velocity(sigma)
    z = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def err(solver, n):
        grid = time_grid(n, s, to_zero=True).double()
        return (solver(v, z, grid).samples - sigma * z).abs().max().item()

    e1, e2 = err(euler, 21), err(euler, 41)
    h1, h2 = err(heun, 21), err(heun, 41)
    assert 1.6 < e1 / e2 < 2.5
    assert 3.3 < h1 / h2 < 4.5
    assert h2 < e2 / 10


def test_sample_dispatch_errors():
    with pytest.raises(ValueError, match="euler, heun, sde"):
        sample("dopri5", lambda x, t: x, torch.zeros(1, 1), num_steps=3)
    with pytest.raises(ValueError, match="grid"):
        euler(lambda x, t: x, torch.zeros(1, 1), torch.tensor([1.0]))


def test_sde_with_one_generator_per_row_equals_batches_of_one():
    """Batched Euler–Maruyama with a generator per row gives each row exactly its batch-of-one result."""
    from rae_cli.samplers import euler_maruyama, time_grid

    def model_fn(x, t):  # elementwise, so batching cannot change the arithmetic
        return x * (1 - t).view(-1, 1, 1, 1) - 0.3

    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = time_grid(6, shift=2.0)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batched = euler_maruyama(model_fn, z, grid, generator=gens).samples
    for i in range(3):
        one = euler_maruyama(model_fn, z[i:i + 1], grid, generator=torch.Generator().manual_seed(100 + i)).samples
        assert torch.equal(batched[i:i + 1], one)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        euler_maruyama(model_fn, z, grid, generator=gens[:2])
