"""The memory planner (``--dry-run``) against live-tensor peaks measured on real CPU runs at small sizes."""

from __future__ import annotations

import pytest
import torch

from rae_cli.build import build_dit_model
from rae_cli.config import resolve
from rae_cli.ema import EMA
from rae_cli.memory_plan import (LiveTensorMeter, TrainSetup, build_fake, measured_peak, plan_sampling,
                                 plan_train_dit, plan_training)
from rae_cli.schema import DiTConfig

SHAPE = (32, 8, 8)


def tiny_dit():
    return build_dit_model(resolve(DiTConfig, preset="tiny"), SHAPE, 10)


def wide_dit():  # parameters dominate the memory (the regime of the XL models at small micro-batches)
    cfg = resolve(DiTConfig, preset="tiny", overrides=["hidden_size=[256,256]", "depth=[2,1]", "num_heads=[4,4]"])
    return build_dit_model(cfg, SHAPE, 10)


def inputs(batch):
    g = torch.Generator().manual_seed(0)
    return lambda: (torch.randn(batch, *SHAPE, generator=g), torch.rand(batch, generator=g),
                    torch.zeros(batch, dtype=torch.long))


def measure_training(factory, batch, precision, ckpt) -> int:
    """Peak live bytes over two real optimizer steps (the second has AdamW's state), model built inside."""
    make = inputs(batch)
    with measured_peak() as meter:
        model = factory()
        model.grad_checkpointing = ckpt
        ema = EMA(model, 0.99)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
        for _ in range(2):
            x, t, y = make()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(x, t, y)
            (out.float() - x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
    return meter.peak


@pytest.mark.parametrize("factory,batch,precision,ckpt", [
    (tiny_dit, 8, "fp32", False), (tiny_dit, 32, "fp32", False), (tiny_dit, 8, "bf16", False),
    (tiny_dit, 32, "fp32", True), (wide_dit, 2, "fp32", False), (wide_dit, 16, "fp32", True),
])
def test_training_plan_matches_measured_peak(factory, batch, precision, ckpt):
    model, mode = build_fake(factory)
    plan = plan_training("t", model, mode, inputs(batch), TrainSetup(precision=precision, grad_checkpointing=ckpt,
                                                                      fused_adamw=False))
    measured = measure_training(factory, batch, precision, ckpt)
    assert 0.8 < plan.peak / measured < 1.25, (plan.lines(), measured)


def test_checkpointing_and_fsdp_lower_the_plan():
    model, mode = build_fake(wide_dit)
    base = plan_training("t", model, mode, inputs(32), TrainSetup(fused_adamw=False))
    ckpt = plan_training("t", model, mode, inputs(32), TrainSetup(grad_checkpointing=True, fused_adamw=False))
    assert ckpt.components["saved activations"] < base.components["saved activations"] / 2
    fsdp = plan_training("t", model, mode, inputs(32), TrainSetup(parallel="fsdp", world_size=4, fused_adamw=False))
    for k in ("weights (fp32)", "gradients (fp32)", "AdamW moments", "EMA"):
        assert fsdp.components[k] == base.components[k] // 4
    assert fsdp.peak < base.peak
    # Accumulating without reduce-scatter keeps whole fp32 gradients until the last micro-batch: counted.
    accum = plan_training("t", model, mode, inputs(32), TrainSetup(parallel="fsdp", world_size=4, fused_adamw=False,
                                                                    grad_accum_steps=2))
    whole = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert accum.components["FSDP whole grads (accumulating)"] == whole
    assert accum.phases["backward"] == (fsdp.phases["backward"] - max(fsdp.components["saved activations"],
                                                                      fsdp.components["gradients (fp32)"])
                                        + fsdp.components["saved activations"] + whole)


def test_sampling_plan_matches_measured_peak():
    model, mode = build_fake(wide_dit)
    plan = plan_sampling("s", model, mode, inputs(16))
    make = inputs(16)
    with measured_peak() as meter:
        real = wide_dit().eval()
        with torch.no_grad():
            real(*make())
    assert 0.8 < plan.peak / meter.peak < 1.25, (plan.lines(), meter.peak)


def test_plan_of_the_xl_preset_counts_the_real_model():
    from rae_cli.train_dit import TrainDiTConfig

    cfg = resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in256", overrides=["global_batch_size=8"])
    plan = plan_train_dit(cfg, world_size=8)  # micro-batch 1: quick on fake tensors
    n = sum(p.numel() for p in build_fake(lambda: build_dit_model(cfg.dit, (768, 16, 16), 1000))[0].parameters())
    assert 838e6 < n < 839e6  # DiT-DH-XL, 838.68M (tests/test_dit.py)
    assert plan.components["weights (fp32)"] == 4 * n
    assert plan.components["AdamW moments"] > 2 * 4 * 830e6  # every trainable parameter, two fp32 moments
    assert plan.components["saved activations"] > 0
    assert "8 process(es) (ddp), micro-batch 1" in plan.what


def test_fsdp_plan_of_the_xl_preset_shards_the_state_and_gathers_one_block():
    from rae_cli.train_dit import TrainDiTConfig

    cfg = resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in256", overrides=["global_batch_size=8",
                                                                                 "parallel=fsdp"])
    ddp = plan_train_dit(resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in256",
                                 overrides=["global_batch_size=8"]), world_size=8)
    plan = plan_train_dit(cfg, world_size=8)
    for k in ("weights (fp32)", "gradients (fp32)", "AdamW moments", "EMA"):
        assert plan.components[k] == ddp.components[k] // 8
    model = build_fake(lambda: build_dit_model(cfg.dit, (768, 16, 16), 1000))[0]
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
    assert block == sum(p.numel() for p in model.blocks[-1].parameters()) > 70e6  # a wide DDT head block
    assert plan.components["FSDP gathered (root + 2 blocks)"] == 4 * (root + 2 * block)
    assert plan.peak < ddp.peak - 3 * 4 * 838e6 * 7 / 8  # 7/8 of weights, moments and EMA saved (at least)
    assert "(fsdp)" in plan.what and any("FSDP over 8 processes" in n for n in plan.notes)
    # bf16: blocks are gathered in bf16; one process: nothing is sharded, whatever parallel says
    bf16 = plan_train_dit(resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in256",
                                  overrides=["global_batch_size=8", "parallel=fsdp", "precision=bf16"]), world_size=8)
    assert bf16.components["FSDP gathered (root + 2 blocks)"] == 2 * (root + 2 * block)
    one = plan_train_dit(cfg, world_size=1)
    assert one.components["weights (fp32)"] == ddp.components["weights (fp32)"]
    assert "FSDP gathered (root + 2 blocks)" not in one.components


def test_meter_ignores_views_and_counts_frees():
    x = torch.zeros(1024)
    with LiveTensorMeter() as m:
        v = x.view(32, 32)  # a view of an older tensor: nothing new
        y = torch.ones(256)  # 1 KiB
        del y
        z = torch.ones(512)  # 2 KiB, after y was freed
    assert m.peak == 2048 and m.current == 2048 and v.shape == (32, 32) and z.numel() == 512
