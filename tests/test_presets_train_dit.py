"""Every train-dit / cache-latents / dit preset resolves against its schema and carries the paper's values."""

from __future__ import annotations

import math
import re

import pytest
import yaml
from typer.testing import CliRunner

from rae_cli.cli import app
from rae_cli.config import list_presets, preset_path, preset_summary, resolve
from rae_cli.latent_cache import CacheLatentsConfig
from rae_cli.schema import DiTConfig
from rae_cli.train_dit import TrainDiTConfig

TRAIN = list_presets("train-dit")
PAPER = ["dit-dh-xl_dinov2-b_in256", "dit-dh-s_dinov2-b_in256", "dit-xl_dinov2-b_in256", "dit-dh-xl_dinov2-b_in512"]


def test_the_required_presets_exist():
    assert set(PAPER + ["tiny"]) <= set(TRAIN)
    assert {"tiny", "dinov2-b_in256", "dinov2-b_in512"} <= set(list_presets("cache-latents"))


@pytest.mark.parametrize("name", TRAIN)
def test_train_dit_preset_dry_run(name, tmp_path):
    res = CliRunner().invoke(app, ["train-dit", "-p", name, "--out", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["dit"]["name"].startswith("DiT")
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("name", PAPER + ["tiny"])
def test_header_summarises_and_gives_launch_lines(name):
    text = preset_path("train-dit", name).read_text()
    assert preset_summary(preset_path("train-dit", name))
    assert re.search(rf"^# 1 GPU: +rae train-dit -p {name} ", text, re.M)
    assert re.search(rf"^# 8 GPUs: torchrun --nproc_per_node 8 -m rae_cli train-dit -p {name} ", text, re.M)


@pytest.mark.parametrize("name", PAPER)
def test_paper_values(name):
    cfg = resolve(TrainDiTConfig, preset=name)
    assert (cfg.epochs, cfg.global_batch_size, cfg.ema_decay) == (1400, 1024, 0.9995)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.clip_grad) == (2e-4, [0.9, 0.95], 0, 1)
    s = cfg.schedule
    assert (s.kind, s.warmup_epochs, s.warmup_from_zero, s.decay_end_epoch, s.final_lr) == ("linear", 40, False,
                                                                                           800, 2e-5)
    assert (cfg.flow.time_dist, cfg.flow.logit_mu, cfg.flow.logit_sigma, cfg.flow.t1) == ("logit-normal", 0, 1, 0.999)
    assert cfg.flow.shift is None and cfg.dit.class_dropout_prob == 0.1 and cfg.num_classes == 1000


def test_512_preset_is_consistent():
    """The official 512 training config pairs a 16×16 model with 32×32 latents; ours derives both from the rae."""
    cfg = resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in512")
    grid = cfg.rae.encoder_input_size // 14  # DINOv2 patch 14: 448 → 32
    assert grid == 32
    assert cfg.flow.resolved_shift([768, grid, grid]) == pytest.approx(math.sqrt(192))
    cache = resolve(CacheLatentsConfig, preset="dinov2-b_in512")
    assert cache.rae.encoder_input_size == cfg.rae.encoder_input_size and cache.image_size == 512


@pytest.mark.parametrize("name", list_presets("cache-latents"))
def test_cache_latents_preset_dry_run(name, tmp_path):
    res = CliRunner().invoke(app, ["cache-latents", str(tmp_path), "--out", str(tmp_path / "c"), "-p", name,
                                   "--dry-run"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name", list_presets("dit"))
def test_dit_presets_resolve(name):
    assert resolve(DiTConfig, preset=name).name.startswith("DiT")
