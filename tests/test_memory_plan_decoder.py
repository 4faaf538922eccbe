"""The train-decoder memory plan (``--dry-run``) against live-tensor peaks of real CPU training steps (tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from rae_cli.config import resolve
from rae_cli.memory_plan import measured_peak
from rae_cli.memory_plan_decoder import plan_train_decoder
from rae_cli.train_decoder import TrainDecoderConfig

TEST_ONLY = ["loss.lpips_random_init=true"]  # random VGG16 trunk; the tiny preset's DINO trunk is random too
WIDE = ["rae.decoder_hidden_size=128", "rae.decoder_intermediate_size=512", "rae.decoder_heads=4"]


def tiny(*overrides):
    return resolve(TrainDecoderConfig, preset="tiny", overrides=[*TEST_ONLY, *overrides])


def measure_step(cfg) -> int:
    """Peak live bytes of two real train-decoder iterations (G step + D step; the second with AdamW's state),
    every network built inside the meter, through the trainer's own StepContext."""
    from rae_cli.build import build_rae
    from rae_cli.decoder_step import StepContext
    from rae_cli.diffaug import DiffAug
    from rae_cli.distributed import Dist
    from rae_cli.ema import EMA
    from rae_cli.gan_losses import GanSchedule
    from rae_cli.perceptual import build_lpips
    from rae_cli.train_decoder import build_disc
    from rae_cli.training.session import autocast, grad_scaler

    g = torch.Generator().manual_seed(0)
    micro = cfg.train.micro_batch_size
    cpu = torch.device("cpu")
    with measured_peak() as meter:
        lpips = build_lpips(None, random_init=True) if cfg.loss.perceptual_weight > 0 else None
        disc = build_disc(cfg.disc, 0)
        rae = build_rae(cfg.rae)
        rae.decoder.grad_checkpointing = cfg.train.grad_checkpointing
        ema = EMA(rae.decoder, 0.9)
        opt_g = torch.optim.AdamW(rae.decoder.parameters(), lr=1e-4, foreach=True)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, foreach=True)
        ctx = StepContext(cfg=cfg, plan=None, dist=Dist(), rae=rae, rae_model=rae, disc=disc, disc_model=disc,
                          lpips=lpips, diffaug=DiffAug(1.0, 0.0, 0.125), schedule=GanSchedule(0, 0, 0, 1),
                          autocast=autocast(cpu, cfg.train.precision))
        scaler = grad_scaler(cpu, "fp32")
        for step in range(2):
            images = [torch.rand(micro, 3, rae.image_size, rae.image_size, generator=g) for _ in range(2)]
            rae.train()
            ctx.generator_step(images, step, opt_g, scaler)
            ema.update(rae.decoder)
            ctx.disc_step(images, step, 0, opt_d, scaler)
    return meter.peak


@pytest.mark.parametrize("overrides", [
    ["train.micro_batch_size=2"],
    ["train.global_batch_size=8", "train.micro_batch_size=4", "train.grad_checkpointing=true"],
    [*WIDE, "train.micro_batch_size=2", "train.precision=bf16", "loss.perceptual_weight=0"],
])
def test_plan_matches_a_measured_training_step(overrides):
    cfg = tiny(*overrides)
    plan = plan_train_decoder(cfg, world_size=1, fused_adamw=False)
    measured = measure_step(cfg)
    assert 0.8 < plan.peak / measured < 1.25, (plan.lines(), measured)


def test_checkpointing_bf16_and_fsdp_lower_the_plan():
    wide = [*WIDE, "train.global_batch_size=64", "train.micro_batch_size=8", "loss.perceptual_weight=0"]
    base = plan_train_decoder(tiny(*wide), world_size=1)
    ckpt = plan_train_decoder(tiny(*wide, "train.grad_checkpointing=true"), world_size=1)
    assert ckpt.components["saved activations (G step)"] < base.components["saved activations (G step)"]
    assert ckpt.phases["G backward"] < base.phases["G backward"]
    bf16 = plan_train_decoder(tiny(*wide, "train.precision=bf16"), world_size=1)
    assert bf16.components["saved activations (G step)"] < base.components["saved activations (G step)"]
    ddp8 = plan_train_decoder(tiny(*wide), world_size=8)
    fsdp8 = plan_train_decoder(tiny(*wide, "train.parallel=fsdp"), world_size=8)
    for k in ("weights (fp32)", "gradients (fp32)", "AdamW moments", "EMA"):
        assert fsdp8.components[k] == ddp8.components[k] // 8
    for k in ("frozen encoder", "discriminator trunk (frozen)", "disc heads (weights)"):  # never sharded
        assert fsdp8.components[k] == ddp8.components[k] > 0
    assert fsdp8.phases["G optimizer step"] < ddp8.phases["G optimizer step"]
    assert "micro-batch 8 (1 per step)" in ddp8.what and "micro-batch 8 (8 per step)" in base.what


def test_dry_run_prints_the_plan_without_weights_images_or_out(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import rae_cli.cli  # noqa: F401 (registers every command on the app)
    from rae_cli.cli.app import app

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "empty-home"))  # no weights anywhere
    res = CliRunner().invoke(app, ["train-decoder", str(tmp_path / "missing"), "-p", "decoder-xl_dinov2-b",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "# memory plan per process — train-decoder ViT-XL decoder on dinov2-b, 256² images, 8 process(es) (ddp), " \
           "micro-batch 64" in res.output
    assert "#   LPIPS VGG16 (frozen)" in res.output and "#   expected peak" in res.output
