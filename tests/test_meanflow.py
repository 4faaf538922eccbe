"""MeanFlow: the JVP total derivative, the r = t reduction to flow matching, the flow → MeanFlow weight rule, a
Gaussian-to-Gaussian toy with a closed-form average velocity, and the train-dit / sample CLI on the tiny presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rae_cli import meanflow
from rae_cli.dit import build_dit, load_flow_into_meanflow
from rae_cli.flow import training_loss
from rae_cli.meanflow import MeanFlowConfig, MeanFlowLoss


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(second_time="interval", name="DiT-DH-S", seed=0, perturb=True):
    torch.manual_seed(seed)
    kw = dict(hidden_size=[32, 64], depth=[1, 1], num_heads=[2, 2]) if name == "DiT-DH-S" else \
        dict(hidden_size=64, depth=2, num_heads=2)
    m = build_dit(name, input_size=4, in_channels=32, num_classes=10, second_time=second_time, **kw)
    if perturb:  # adaLN-zero makes a fresh model output 0: give every weight some signal
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return m.double().eval()


def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, 4, 4, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(10, (n,), generator=g)
    return z, r, t, y, torch.randn(z.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["DiT-DH-S", "DiT-S"])
@pytest.mark.parametrize("second_time", ["interval", "r"])
def test_jvp_total_derivative_matches_finite_differences(name, second_time):
    model = tiny(second_time, name)
    z, r, t, y, v = batch()
    net = lambda z_, r_, t_: model(z_, t_, y, r=r_)  # noqa: E731
    u, dudt = meanflow.total_derivative(net, z, r, t, v, method="jvp")
    # central difference along the path (z + h·v, r, t + h); RMSNorm works in fp32, so h cannot be tiny
    h = 1e-3
    fd = (net(z + h * v, r, t + h) - net(z - h * v, r, t - h)) / (2 * h)
    scale = float(dudt.abs().max())
    assert scale > 1e-2  # not trivially zero
    torch.testing.assert_close(dudt, fd, rtol=0, atol=1e-3 * scale)
    wrong = (net(z + h * v, r + h, t + h) - net(z - h * v, r - h, t - h)) / (2 * h)  # tangent (v, 1, 1): not it
    assert float((wrong - dudt).abs().max()) > 1e-2 * scale
    torch.testing.assert_close(u, net(z, r, t))
    _, fd2 = meanflow.total_derivative(net, z, r, t, v, method="finite-difference", delta=h)
    torch.testing.assert_close(fd2, fd)


@pytest.mark.parametrize("derivative", ["jvp", "finite-difference"])
def test_r_equal_t_loss_is_the_flow_matching_loss(derivative):
    model = tiny()
    z, _, t, y, noise = batch(4)
    cfg = MeanFlowConfig(adaptive_p=0.0, derivative=derivative)
    weighted, mse = MeanFlowLoss(cfg, null_label=10)(model, model, z, y, None, t, t, noise)
    with meanflow.math_attention():
        flow = training_loss(lambda x_, t_, **kw: model(x_, t_, **kw), z, {"y": y}, t=t, noise=noise)
    torch.testing.assert_close(weighted, flow)
    torch.testing.assert_close(mse, flow)
    # r < t changes the target (the model's derivative enters), the adaptive weight changes the value
    _, r, t2, _, _ = batch(4)
    assert not torch.allclose(MeanFlowLoss(cfg, 10)(model, model, z, y, None, r, t2, noise)[1],
                              MeanFlowLoss(cfg, 10)(model, model, z, y, None, t2, t2, noise)[1])
    w, m = MeanFlowLoss(MeanFlowConfig(adaptive_p=1.0), 10)(model, model, z, y, None, t, t, noise)
    torch.testing.assert_close(w, m / (m + 1e-3))


def test_flow_checkpoint_is_a_meanflow_initialisation():
    flow = tiny("none", perturb=True)
    assert not any(k.startswith("r_embedder") for k in flow.state_dict())  # default keys unchanged
    mf = tiny("interval", perturb=False)
    kept = load_flow_into_meanflow(mf, flow.state_dict())
    assert kept and all(k.startswith("r_embedder.") for k in kept)
    z, r, t, y, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(mf(z, t, y, r=r), flow(z, t, y))  # the flow model at every (r, t)
        torch.testing.assert_close(mf(z, t, y), flow(z, t, y))
    with pytest.raises(ValueError, match="second time"):
        flow(z, t, y, r=r)
    with pytest.raises(ValueError, match="missing"):
        load_flow_into_meanflow(tiny("interval", name="DiT-S", perturb=False), flow.state_dict())


def test_rt_sampler_share_and_order():
    g = torch.Generator().manual_seed(0)
    r, t = meanflow.sample_rt(20000, ratio_r_neq_t=0.25, kind="logit-normal", shift=2.0, generator=g)
    assert (r <= t).all() and ((t >= 0) & (t <= 1)).all()
    assert abs(float((r < t).float().mean()) - 0.25) < 0.02
    r0, _ = meanflow.sample_rt(100, ratio_r_neq_t=0.0, generator=torch.Generator().manual_seed(0))
    assert meanflow.meanflow_grid(1).tolist() == [1.0, 0.0]
    grid = meanflow.meanflow_grid(2, shift=3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and math.isclose(float(grid[1]), 1.5 / 2.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------- Gaussian toy
# Data x ~ N(μ, diag(s²)), noise ε ~ N(0, I), z_t = (1 − t)·x + t·ε: z_t ~ N(m_t, σ_t²) per dimension with
# m_t = (1 − t)·μ, σ_t² = (1 − t)²s² + t². The ODE map is affine: z_r = m_r + (σ_r/σ_t)(z_t − m_t), so the average
# velocity is u(z, r, t) = (z − z_r)/(t − r), and the marginal velocity v(z, t) = −μ + (σ_t'/σ_t)(z − m_t).

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)


def _sigma(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_velocity(z, t, y=None):
    t = t[:, None]
    sig = _sigma(t)
    dsig = (-(1 - t) * S**2 + t) / sig
    return -MU + dsig / sig * (z - (1 - t) * MU)


def exact_average_velocity(z, r, t):
    r_, t_ = r[:, None], t[:, None]
    z_r = (1 - r_) * MU + _sigma(r_) / _sigma(t_) * (z - (1 - t_) * MU)
    return (z - z_r) / (t_ - r_)


class ToyMeanFlow(nn.Module):
    """u(z, r, t) = a(t, t − r)·z + b(t, t − r) per dimension: can express the exact average velocity."""

    grad_checkpointing = False

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4))

    def forward(self, z, t, y=None, *, r=None, force_drop_ids=None):
        r = t if r is None else r
        a, b = self.net(torch.stack([t, t - r], dim=-1)).chunk(2, dim=-1)
        return a * z + b


def test_gaussian_toy_reaches_zero_loss_and_one_step_samples_are_right():
    torch.manual_seed(0)
    model = ToyMeanFlow().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = MeanFlowConfig(ratio_r_neq_t=0.5, adaptive_p=0.0)
    loss_fn = MeanFlowLoss(cfg, null_label=-1, teacher=exact_velocity)  # the exact marginal velocity as teacher
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(256, dtype=torch.long)
    first, steps = None, 1000
    for step in range(steps):
        x = MU + S * torch.randn(256, 2, generator=g, dtype=torch.float64)
        noise = torch.randn(256, 2, generator=g, dtype=torch.float64)
        r, t = meanflow.sample_rt(256, ratio_r_neq_t=0.5, kind="uniform", t1=1.0, generator=g)
        loss, mse = loss_fn(model, model, x, y, None, r.double(), t.double(), noise)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 1e-2 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        first = float(mse.mean()) if first is None else first
    assert float(mse.mean()) < 2e-3 * first  # the target is deterministic here: its minimum is 0
    z = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        one = meanflow.sample(lambda x_, r_, t_: model(x_, t_, r=r_), z, num_steps=1).samples
        r, t = torch.full((len(z),), 0.0, dtype=torch.float64), torch.ones(len(z), dtype=torch.float64)
        err = (model(z, t, r=r) - exact_average_velocity(z, r, t)).abs().mean()
    assert float(err) < 0.05
    torch.testing.assert_close(one.mean(0), MU, atol=0.05, rtol=0)
    torch.testing.assert_close(one.std(0), S, atol=0.05, rtol=0)


def test_sampler_with_the_exact_average_velocity_is_exact():
    z = torch.randn(5, 2, dtype=torch.float64)
    for steps in (1, 2, 5):
        out = meanflow.sample(exact_average_velocity, z, num_steps=steps, shift=2.0)
        assert out.nfe == steps
        torch.testing.assert_close(out.samples, MU + S * z)  # the ODE map from N(0, I) to N(μ, s²)


def test_folded_guidance_target_and_teacher_velocity():
    model = tiny().train()  # training mode: the guidance passes must not use the random label dropout
    z, r, t, y, noise = batch(4)
    drop = torch.tensor([0, 1, 0, 0])
    cfg = MeanFlowConfig(guidance_scale=2.0, guidance_kappa=0.5, guidance_t_max=0.99, adaptive_p=0.0)
    loss = MeanFlowLoss(cfg, null_label=10)
    a, b = loss(model, model, z, y, drop, r, t, noise), loss(model, model, z, y, drop, r, t, noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    def net(z_, r_, t_, y_):
        return model(z_, t_, y_, r=r_, force_drop_ids=torch.zeros_like(y_))

    v = noise - z
    got = meanflow.target_velocity(net, z, t, y, drop, v, 10, cfg)
    with torch.no_grad():
        cond, uncond = net(z, t, t, y), net(z, t, t, torch.full_like(y, 10))
    want = 2.0 * v + 0.5 * cond + (1 - 2.0 - 0.5) * uncond
    keep = (drop == 0) & (t <= 0.99)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[~keep], v[~keep])  # dropped labels / outside the interval: unguided
    assert meanflow.target_velocity(net, z, t, y, drop, v, 10, MeanFlowConfig()) is v

    teacher = tiny("none", seed=5)
    tv = meanflow.teacher_velocity(teacher, z, t, y, drop, 10, MeanFlowConfig(guidance_scale=3.0))
    with torch.no_grad():
        c, u = teacher(z, t, y).float(), teacher(z, t, torch.full_like(y, 10)).float()
    torch.testing.assert_close(tv[drop == 0], (u + 3.0 * (c - u))[drop == 0], rtol=1e-5, atol=1e-5)
    # a dropped label: the teacher sees the null label both times → its unconditional velocity
    torch.testing.assert_close(tv[drop == 1], u[drop == 1], rtol=1e-5, atol=1e-6)
