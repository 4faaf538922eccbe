"""Flow-matching math: analytic identities of the path and time shift, and parity with the official transport."""

from __future__ import annotations

import math

import pytest
import torch
from parity_fixtures import sub_state_dict

from rae_cli.checkpoint import strict_load
from rae_cli.dit import DiTDH
from rae_cli.flow import (draw_noise_and_time, interpolate, logit_normal_from_uniform, sample_time,
                          sample_training_loss, shift_from_shape, shift_time, training_loss, velocity_target)


def _fixture_shift(meta) -> float:
    """The loss fixtures' shift, from the metadata (e.g. "sqrt(196608/4096) = 6.928203230275509")."""
    return float(str(meta["time_dist_shift"]).split("=")[-1])


def _transport_model(tensors, meta) -> DiTDH:
    model = DiTDH(**meta["model_config"]).eval()
    strict_load(model, sub_state_dict(tensors, "state_dict."), "transport tiny model")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Analytic identities


def test_shift_fixed_points_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (1.0, 0.5, math.sqrt(48)):
        shifted = shift_time(t, s)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert (shifted[1:] > shifted[:-1]).all()
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert (shift_time(t, 4.0) >= t).all()  # s > 1 pushes times towards noise
    # shift(s) then shift(1/s) is the identity (a Möbius map group)
    torch.testing.assert_close(shift_time(shift_time(t, 3.0), 1 / 3.0), t)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)


def test_shift_from_shape():
    assert shift_from_shape([768, 16, 16]) == pytest.approx(math.sqrt(48))
    assert shift_from_shape((768, 32, 32)) == pytest.approx(math.sqrt(192))
    assert shift_from_shape([16, 16, 16]) == pytest.approx(1.0)
    assert shift_from_shape([8, 4, 4], base=32) == pytest.approx(2.0)


def test_path_endpoints_and_velocity_is_time_derivative():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(interpolate(x, eps, torch.zeros(3)), x)
    torch.testing.assert_close(interpolate(x, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    _, dxdt = torch.autograd.functional.jvp(lambda tt: interpolate(x, eps, tt), (t,), (torch.ones(3),))
    torch.testing.assert_close(dxdt, velocity_target(x, eps))
    # per-sample times: sample 1 at t = 0.5 is the midpoint
    torch.testing.assert_close(interpolate(x, eps, t.detach())[1], 0.5 * (x[1] + eps[1]))


def test_training_loss_is_zero_for_the_exact_velocity_and_per_sample():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.rand(4, generator=g)
    loss = training_loss(lambda xt, tt: eps - x, x, t=t, noise=eps)
    assert loss.shape == (4,) and torch.count_nonzero(loss) == 0
    loss = training_loss(lambda xt, tt, y: torch.zeros_like(xt), x, {"y": None}, t=t, noise=eps)
    torch.testing.assert_close(loss, (eps - x).square().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="shapes"):
        training_loss(lambda xt, tt: xt, x, t=t[:2], noise=eps)


def test_sample_time_ranges_and_reproducibility():
    for kind in ("uniform", "logit-normal"):
        t = sample_time(4000, kind, t0=0.1, t1=0.9, generator=torch.Generator().manual_seed(0))
        assert t.dtype == torch.float32 and t.min() >= 0.1 and t.max() <= 0.9
        again = sample_time(4000, kind, t0=0.1, t1=0.9, generator=torch.Generator().manual_seed(0))
        assert torch.equal(t, again)
    with pytest.raises(ValueError, match="time distribution"):
        sample_time(2, "beta")
    with pytest.raises(ValueError, match="t0 < t1"):
        sample_time(2, t0=0.5, t1=0.5)


def test_logit_normal_distribution():
    t = sample_time(200_000, "logit-normal", mu=0.5, sigma=0.8, t1=1.0, generator=torch.Generator().manual_seed(0))
    z = torch.logit(t.double())
    assert z.mean().item() == pytest.approx(0.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.8, abs=0.01)


def test_shifted_time_statistics_match_the_spec():
    """Spec §4 measured at s = √48: logit-normal(0,1) median 0.874 / mean 0.837; uniform median 0.874 / mean 0.787."""
    s = shift_from_shape([768, 16, 16])
    g = torch.Generator().manual_seed(0)
    ln = sample_time(200_000, "logit-normal", shift=s, generator=g)
    un = sample_time(200_000, "uniform", shift=s, generator=g)
    assert ln.median().item() == pytest.approx(0.874, abs=0.004)
    assert ln.mean().item() == pytest.approx(0.837, abs=0.004)
    assert un.median().item() == pytest.approx(0.874, abs=0.004)
    assert un.mean().item() == pytest.approx(0.787, abs=0.004)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official transport


def _shift_keys() -> list[str]:
    """The time-shift cases the fixture set holds (``timeshift.<key>.shift``), read at collection time."""
    from parity_fixtures import parity_dir

    from rae_cli.checkpoint import load_safetensors

    tensors, _ = load_safetensors(parity_dir() / "transport.safetensors")
    return sorted({k.split(".")[1] for k in tensors if k.startswith("timeshift.") and k.endswith(".shift")})


@pytest.mark.parametrize("key", _shift_keys())
def test_timeshift_parity(parity, key):
    tensors, meta = parity("transport")
    s = tensors[f"timeshift.{key}.shift"].item()
    t_raw, t_shifted = tensors[f"timeshift.{key}.t_raw"], tensors[f"timeshift.{key}.t_shifted"]
    torch.testing.assert_close(shift_time(t_raw, s), t_shifted, atol=1e-7, rtol=0)
    # replaying the official RNG order (randn_like of an (n, 1) batch first, then rand(n)) gives the same draw
    n = t_shifted.numel()
    noise, t = draw_noise_and_time(torch.zeros(n, 1), kind="uniform", shift=s,
                                   generator=torch.Generator().manual_seed(meta["seeds"]["timeshift"]))
    assert noise.shape == (n, 1)
    torch.testing.assert_close(t, t_shifted, atol=1e-7, rtol=0)


def test_logit_normal_parity(parity):
    tensors, meta = parity("transport")
    u, t = tensors["logitnormal.u"], tensors["logitnormal.t"]
    t0, t1 = meta["transport_params"]["t0"], meta["transport_params"]["t1"]
    torch.testing.assert_close(logit_normal_from_uniform(u, 0.0, 1.0, t0, t1), t, atol=1e-6, rtol=0)
    replay = sample_time(u.numel(), "logit-normal", mu=0.0, sigma=1.0, t0=t0, t1=t1,
                         generator=torch.Generator().manual_seed(meta["seeds"]["logitnormal"]))
    torch.testing.assert_close(replay, t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dist,kind", [("logitnormal", "logit-normal"), ("uniform", "uniform")])
def test_training_loss_parity(parity, dist, kind):
    tensors, meta = parity("transport")
    model = _transport_model(tensors, meta)
    x1, y = tensors["loss.x1"], tensors["loss.y"]
    pre = f"loss.{dist}."
    t, noise = tensors[pre + "t"], tensors[pre + "x0"]
    torch.testing.assert_close(interpolate(x1, noise, t), tensors[pre + "xt"], atol=1e-6, rtol=0)
    torch.testing.assert_close(velocity_target(x1, noise), tensors[pre + "ut"], atol=1e-6, rtol=0)
    with torch.no_grad():
        pred = model(tensors[pre + "xt"], t, y)
        loss = training_loss(model, x1, {"y": y}, t=t, noise=noise)
    torch.testing.assert_close(pred, tensors[pre + "pred"], atol=2e-6, rtol=0)
    torch.testing.assert_close(loss, tensors[pre + "loss"], atol=1e-5, rtol=1e-6)
    # The whole draw replays from a generator seeded like the official global RNG (noise first, then t).
    shift = _fixture_shift(meta)
    seed, t0, t1 = meta["seeds"]["loss"], meta["transport_params"]["t0"], meta["transport_params"]["t1"]
    noise_r, t_r = draw_noise_and_time(x1, kind=kind, shift=shift, t0=t0, t1=t1,
                                       generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(noise_r, noise, atol=0, rtol=0)
    torch.testing.assert_close(t_r, t, atol=1e-6, rtol=0)
    with torch.no_grad():
        loss_r = sample_training_loss(model, x1, {"y": y}, generator=torch.Generator().manual_seed(seed), kind=kind,
                                      shift=shift, t0=t0, t1=t1)
    torch.testing.assert_close(loss_r, tensors[pre + "loss"], atol=1e-5, rtol=1e-6)
