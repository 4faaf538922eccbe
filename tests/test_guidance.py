"""Guidance: CFG with an interval and AutoGuidance match the official model methods, and spend no wasted compute."""

from __future__ import annotations

import pytest
import torch
from parity_fixtures import sub_state_dict

from rae_cli.checkpoint import strict_load
from rae_cli.dit import DiTDH, LightningDiT
from rae_cli.guidance import CountingModel, autoguidance, cfg, conditional, guided_model_fn, interval_mask
from rae_cli.samplers import euler, heun, time_grid


@pytest.fixture(scope="module")
def ddt(parity):
    tensors, meta = parity("ditddh_small")
    model = DiTDH(**meta["config"]).eval()
    strict_load(model, sub_state_dict(tensors, "state_dict."), "ditddh_small")
    guide = DiTDH(**meta["ag_config"]).eval()
    strict_load(guide, sub_state_dict(tensors, "ag_state_dict."), "ditddh_small ag")
    return model, guide, tensors, meta


@pytest.fixture(scope="module")
def lightning(parity):
    tensors, meta = parity("lightningdit_small")
    model = LightningDiT(**meta["config"]).eval()
    strict_load(model, sub_state_dict(tensors, "state_dict."), "lightningdit_small")
    return model, tensors, meta


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere trainable (the zero-init adaLN / final layers would make every output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


TINY_DDT = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=[32, 64], depth=[1, 1], num_heads=[2, 2],
                num_classes=5)


@pytest.fixture(scope="module")
def tiny():
    """Inline tiny DiT-DH main and guide models, for the tests that count calls (no official outputs needed)."""
    torch.manual_seed(0)
    model = _perturbed(DiTDH(**TINY_DDT), 1)
    guide = _perturbed(DiTDH(**{**TINY_DDT, "hidden_size": [16, 32]}), 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 4, 4, generator=g)
    return model, guide, x, torch.tensor([0.05, 0.5, 0.93]), torch.tensor([1, 4, 5])  # y = 5: the null label


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=max(2e-6, 2e-6 * b.abs().max().item()), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Official-signature helpers on the models


@pytest.mark.parametrize("key,interval", [("0.2_0.6", (0.2, 0.6)), ("0_1", (0.0, 1.0))])
def test_ddt_forward_with_cfg_parity(ddt, key, interval):
    model, _, tensors, _ = ddt
    with torch.no_grad():
        out = model.forward_with_cfg(tensors["input.cfg_x"], tensors["input.cfg_t"], tensors["input.cfg_y"],
                                     cfg_scale=4.0, cfg_interval=interval)
    _close(out, tensors[f"output.forward_with_cfg_interval_{key}"])


def test_ddt_forward_with_autoguidance_parity(ddt):
    model, guide, tensors, _ = ddt
    with torch.no_grad():
        out = model.forward_with_autoguidance(tensors["input.x"], tensors["input.t"], tensors["input.y"],
                                              cfg_scale=1.5, additional_model_forward=guide.forward,
                                              cfg_interval=(0.0, 0.6))
    _close(out, tensors["output.forward_with_autoguidance"])


def test_lightning_forward_with_cfg_parity(lightning):
    model, tensors, _ = lightning
    x, t, y = tensors["input.cfg_x"], tensors["input.cfg_t"], tensors["input.cfg_y"]
    with torch.no_grad():
        plain = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_interval=[(0.9, 1.0)])
        interval = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_interval=[(0.4, 0.6)], interval_cfg=2.0)
        default = model.forward_with_cfg(x, t, y, 4.0)  # the official default crashed; here: plain CFG
        single_pair = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_interval=(0.4, 0.6), interval_cfg=2.0)
        cond_only = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_interval=[(0.4, 0.6)])
    _close(plain, tensors["output.forward_with_cfg"])
    _close(interval, tensors["output.forward_with_cfg_interval_cfg2"])
    assert torch.equal(default, plain) and torch.equal(single_pair, interval)
    with torch.no_grad():
        _close(cond_only[:2], model(x[:2], t[:2], y[:2]))  # inside an interval with interval_cfg ≤ 1: conditional


def test_lightning_forward_with_autoguidance_halves_the_batch():
    torch.manual_seed(0)
    model = _perturbed(LightningDiT(input_size=4, patch_size=2, in_channels=8, hidden_size=32, depth=1, num_heads=2,
                                    num_classes=5), 1)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2)).repeat(2, 1, 1, 1)  # official CFG batch
    t, y = torch.full((4,), 0.5), torch.tensor([1, 3, 5, 5])
    guide = CountingModel(lambda xx, tt, yy: 0.5 * model(xx, tt, yy))
    with torch.no_grad():
        out = model.forward_with_autoguidance(x, t, y, cfg_scale=3.0, additional_model_forward=guide)
        main = model(x[:2], t[:2], y[:2])
    assert guide.batch_sizes == [2]
    _close(out[:2], 0.5 * main + 3.0 * (main - 0.5 * main))
    assert torch.equal(out[:2], out[2:])


# ----------------------------------------------------------------------------------------------------------------
# The model_fn wrappers reproduce the official results without the wasted halves


def test_interval_mask_inclusive():
    t = torch.tensor([0.0, 0.2, 0.5, 0.6, 0.61])
    assert interval_mask(t, 0.2, 0.6).tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("key,interval,batches", [("0.2_0.6", (0.2, 0.6), [3]), ("0_1", (0.0, 1.0), [4])])
def test_cfg_wrapper_parity_and_cost(ddt, key, interval, batches):
    model, _, tensors, meta = ddt
    ref = tensors[f"output.forward_with_cfg_interval_{key}"]
    n = len(ref) // 2
    assert torch.equal(ref[:n], ref[n:])  # the official result is duplicated; the first half is the answer
    x, t, y = tensors["input.cfg_x"][:n], tensors["input.cfg_t"][:n], tensors["input.cfg_y"][:n]
    null = tensors["input.cfg_y"][n:]
    assert (null == meta["config"]["num_classes"]).all()  # the official caller passes null labels = num_classes
    counted = CountingModel(model)
    with torch.no_grad():
        out = cfg(counted, y, 4.0, t_min=interval[0], t_max=interval[1])(x, t)
    _close(out, ref[:n])
    # [0.2, 0.6] with t = [0.1, 0.5]: one forward of B + 1 (only sample 1 needs the null pass)
    assert counted.batch_sizes == batches


def test_cfg_outside_interval_and_scale_one_run_only_conditional(tiny):
    model, _, x, t, y = tiny
    counted = CountingModel(model)
    with torch.no_grad():
        out = cfg(counted, y, 4.0, t_min=0.95, t_max=1.0)(x, t)
        assert counted.batch_sizes == [3]
        _close(out, model(x, t, y))
        counted.reset()
        cfg(counted, y, 1.0)(x, t)
    assert counted.batch_sizes == [3]


def test_autoguidance_wrapper_parity_and_cost(ddt):
    model, guide, tensors, _ = ddt
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    main_c, guide_c = CountingModel(model), CountingModel(guide)
    with torch.no_grad():
        out = autoguidance(main_c, guide_c, y, 1.5, t_min=0.0, t_max=0.6)(x, t)
    _close(out, tensors["output.forward_with_autoguidance"])
    # t = [0.05, 0.5, 0.93]: the main model sees the batch once, the guide only the 2 samples inside [0, 0.6]
    assert main_c.batch_sizes == [3] and guide_c.batch_sizes == [2]


def test_autoguidance_sampling_costs_one_main_and_one_guide_pass_per_step(tiny):
    model, guide, x, _, y = tiny
    B = len(y)
    for solver, per_step in ((euler, 1), (heun, 2)):
        main_c, guide_c = CountingModel(model), CountingModel(guide)
        with torch.no_grad():
            res = solver(autoguidance(main_c, guide_c, y, 1.42), x, time_grid(6, 2.0))
        assert res.nfe == 5 * per_step
        assert main_c.batch_sizes == [B] * res.nfe and guide_c.batch_sizes == [B] * res.nfe  # never 2B
        assert torch.isfinite(res.samples).all()


def test_guided_model_fn_dispatch_parity(ddt):
    model, guide, tensors, _ = ddt
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    with torch.no_grad():
        assert torch.equal(guided_model_fn(model, y)(x, t), conditional(model, y)(x, t))
        _close(guided_model_fn(model, y, "autoguidance", 1.5, 0.0, 0.6, guide_model=guide)(x, t),
               tensors["output.forward_with_autoguidance"])
        assert torch.equal(guided_model_fn(model, y, "cfg", 2.0)(x, t), cfg(model, y, 2.0)(x, t))
    with pytest.raises(ValueError, match="guide model"):
        guided_model_fn(model, y, "autoguidance", 1.5)
    with pytest.raises(ValueError, match="unknown guidance"):
        guided_model_fn(model, y, "pag", 1.5)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        cfg(model, y, 2.0, t_min=0.7, t_max=0.2)
    with pytest.raises(ValueError, match="labels"):
        conditional(model, y)(x[:2], t[:2])
    with pytest.raises(ValueError, match="null_label"):
        cfg(lambda a, b, c: a, y, 2.0)
