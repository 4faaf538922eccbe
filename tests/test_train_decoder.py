"""``rae train-decoder`` on the tiny preset (CPU): every loss active, bit-identical resume, checkpoint contents, export.

TEST DOUBLES: the encoder (rae=tiny), the LPIPS VGG16 trunk (loss.lpips_random_init=true) and the discriminator's
DINO backbone (tiny preset) are all randomly initialised, so no weights are needed; nothing here is a real loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rae_cli.checkpoint import load_safetensors
from rae_cli.cli.app import app
from rae_cli.config import ConfigError, resolve
from rae_cli.train_decoder import TrainDecoderConfig, build_disc, step_items, train_decoder

TEST_ONLY = ["loss.lpips_random_init=true"]  # a random VGG16 trunk: explicitly requested, test only


def _write_images(root, n: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 40 + 4 * (i % 3), 40 + 6 * (i % 2)  # mixed sizes and aspect ratios
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i}.png")


def _cfg(images, *overrides: str) -> TrainDecoderConfig:
    return resolve(TrainDecoderConfig, preset="tiny", overrides=[f"data.path={images}", *TEST_ONLY, *overrides])


def _metrics(run) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: 4 steps in one go (library). Run B: 2 steps through the CLI (stop_after=2), then resumed by re-running."""
    import rae_cli.perceptual as perceptual

    root = tmp_path_factory.mktemp("train_decoder")
    images = root / "images"
    _write_images(images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy machine
    built = {}
    real_build = perceptual.build_lpips

    def cached_build_lpips(vgg_weights=None, random_init=False):
        # The frozen random-init LPIPS is the same module in every run (building VGG16 takes seconds).
        if (vgg_weights, random_init) not in built:
            built[(vgg_weights, random_init)] = real_build(vgg_weights, random_init=random_init)
        return built[(vgg_weights, random_init)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(perceptual, "build_lpips", cached_build_lpips)
        try:
            a = train_decoder(cfg=_cfg(images), out_dir=root / "a")
            result = CliRunner().invoke(app, ["train-decoder", str(images), "--out", str(root / "b"), "-p", "tiny",
                                              *TEST_ONLY, "train.stop_after=2"])
            assert result.exit_code == 0, result.output
            b_half = sorted(p.name for p in (root / "b" / "checkpoints").glob("step-*"))
            b_half_export = (root / "b" / "export").exists()
            b = train_decoder(cfg=_cfg(images), out_dir=root / "b")
        finally:
            torch.set_num_threads(threads)
    return dict(root=root, images=images, a=a, b=b, b_half=b_half, b_half_export=b_half_export)


def _ckpt(run, step: int):
    return run / "checkpoints" / f"step-{step:09d}"


def _assert_same_state(x: dict, y: dict, what: str) -> None:
    assert x.keys() == y.keys(), what
    bad = [k for k in x if not torch.equal(x[k], y[k])]
    assert not bad, f"{what} differs in {bad[:5]}"


def test_resume_is_bit_identical(runs):
    root, a, b = runs["root"], runs["a"], runs["b"]
    assert runs["b_half"] == ["step-000000002"] and not runs["b_half_export"]  # stopped at 2, not exported yet
    assert a.step == b.step == a.plan.total_steps == 4
    for name in ("decoder", "ema", "disc"):
        _assert_same_state(load_safetensors(_ckpt(root / "a", 4) / f"{name}.safetensors")[0],
                           load_safetensors(_ckpt(root / "b", 4) / f"{name}.safetensors")[0], name)
    _assert_same_state(a.decoder.state_dict(), b.decoder.state_dict(), "decoder module")
    _assert_same_state(a.ema_decoder.state_dict(), b.ema_decoder.state_dict(), "EMA module")
    _assert_same_state(a.disc.state_dict(), b.disc.state_dict(), "discriminator module")
    # The losses logged after the resume are the ones of the uninterrupted run.
    ma, mb = _metrics(root / "a"), _metrics(root / "b")
    for step in (3, 4):
        for key in ("l1", "lpips", "gan_g", "d_weight", "d_loss", "loss", "lr", "lr_d"):
            assert ma[step][key] == mb[step][key], (step, key)
    # Training moved the weights (a run that does nothing would also "resume identically").
    fresh = build_disc(_cfg(runs["images"]).disc, seed=0)
    assert any(not torch.equal(v, a.disc.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert not torch.equal(a.decoder.decoder_pred.weight, a.ema_decoder.decoder_pred.weight)


def test_every_loss_is_active_from_the_first_step(runs):
    rows = _metrics(runs["root"] / "a")
    assert sorted(k for k in rows if isinstance(k, int)) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        row = rows[step]
        for key in ("l1", "lpips", "gan_g", "d_weight", "d_loss", "logits_real", "logits_fake"):
            assert key in row and math.isfinite(row[key]), (step, key)
        assert row["lpips"] > 0 and row["d_weight"] > 0 and row["d_loss"] > 0
        assert row["loss"] != pytest.approx(row["l1"] + row["lpips"])  # the GAN term is in the total
    # Warmup from zero over half an epoch (1 step), then cosine to final_lr at step 4.
    assert rows[1]["lr"] == pytest.approx(2e-4) and rows[4]["lr"] < rows[3]["lr"] < 2e-4
    # The held-out check ran on the EMA decoder (PSNR/SSIM logged, grid saved).
    assert "eval_psnr" in rows[4] and math.isfinite(rows[4]["eval_psnr"])
    assert (runs["root"] / "a" / "samples" / "step-000000004.png").is_file()


def test_checkpoint_holds_decoder_ema_and_disc_heads_only(runs):
    ckpt = _ckpt(runs["root"] / "a", 4)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "decoder.safetensors", "disc.safetensors",
                                                      "ema.safetensors", "meta.json", "resume.pt"]
    decoder_keys = set(runs["a"].decoder.state_dict())
    for name in ("decoder", "ema"):
        assert set(load_safetensors(ckpt / f"{name}.safetensors")[0]) == decoder_keys  # no encoder.* keys
    disc = load_safetensors(ckpt / "disc.safetensors")[0]
    assert disc and all(k.startswith("heads.") for k in disc)  # the frozen DINO backbone is not saved
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "train-decoder" and meta["step"] == 4 and meta["steps_per_epoch"] == 2
    state = torch.load(ckpt / "resume.pt", weights_only=True)
    assert set(state) == {"step", "opt_g", "opt_d", "scaler_g", "scaler_d"}
    # Retention: keep_last=2 of the checkpoints at steps 2 and 4.
    assert sorted(p.name for p in (runs["root"] / "a" / "checkpoints").glob("step-*")) == [
        "step-000000002", "step-000000004"]


def test_export_is_an_rae_preset_with_the_ema_decoder(runs, tmp_path):
    from rae_cli.build import build_rae
    from rae_cli.schema import RAEConfig

    export = runs["root"] / "a" / "export"
    ema = runs["a"].ema_decoder.state_dict()
    _assert_same_state(load_safetensors(export / "decoder.safetensors")[0], ema, "exported safetensors")
    # The official layout: a raw decoder state dict (GeneralDecoder keys, no prefix), as pretrained_decoder_path wants.
    _assert_same_state(torch.load(export / "model.pt", weights_only=True), ema, "exported model.pt")
    rae_cfg = resolve(RAEConfig, preset=str(export / "rae.yaml"))
    assert rae_cfg.noise_tau == 0.0 and rae_cfg.decoder_weights == str((export / "decoder.safetensors").resolve())
    rae = build_rae(rae_cfg)
    _assert_same_state(rae.decoder.state_dict(), ema, "decoder built from rae.yaml")
    result = CliRunner().invoke(app, ["recon", str(runs["images"]), "--out", str(tmp_path / "recon"),
                                      "--preset", str(export / "rae.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "recon" / "metrics.json").read_text())["num_images"] == 10


def test_export_decoder_command(runs, tmp_path):
    run = runs["root"] / "a"
    result = CliRunner().invoke(app, ["export-decoder", str(run), "--out", str(tmp_path / "raw"), "--no-ema"])
    assert result.exit_code == 0, result.output
    _assert_same_state(load_safetensors(tmp_path / "raw" / "decoder.safetensors")[0],
                       load_safetensors(_ckpt(run, 4) / "decoder.safetensors")[0], "raw export")
    assert (tmp_path / "raw" / "model.pt").is_file() and (tmp_path / "raw" / "rae.yaml").is_file()
    result = CliRunner().invoke(app, ["export-decoder", str(tmp_path)])
    assert result.exit_code == 2 and "no checkpoint found" in result.output


def test_rerun_with_a_changed_config_is_refused(runs):
    with pytest.raises(ConfigError, match="train.lr"):
        train_decoder(cfg=_cfg(runs["images"], "train.lr=1e-3"), out_dir=runs["root"] / "a")


def test_missing_lpips_weights_is_a_clear_error(runs, tmp_path):
    from rae_cli.weights import WeightsNotFoundError

    cfg = _cfg(runs["images"], "loss.lpips_random_init=false", f"loss.lpips_weights={tmp_path / 'vgg16.pth'}")
    with pytest.raises(WeightsNotFoundError, match="VGG16"):
        train_decoder(cfg=cfg, out_dir=tmp_path / "run")


def test_data_order_and_crops_depend_on_seed_rank_and_step_only():
    from rae_cli.train_decoder import Plan

    plan = Plan(num_train=8, steps_per_epoch=2, total_steps=4, micro_batch=1, accum=2, world_size=2)
    # One epoch: the two ranks' shares of its two steps partition the training set.
    seen = [i for step in (0, 1) for rank in (0, 1) for mb in step_items(plan, step, seed=0, rank=rank)
            for i, _ in mb]
    assert sorted(seen) == list(range(8))
    assert step_items(plan, 3, seed=0, rank=1) == step_items(plan, 3, seed=0, rank=1)
    assert step_items(plan, 3, seed=0, rank=1) != step_items(plan, 3, seed=1, rank=1)
    assert [s for mb in step_items(plan, 2, seed=0, rank=0) for _, s in mb] != \
        [s for mb in step_items(plan, 2, seed=0, rank=1) for _, s in mb]


def test_presets_hold_the_paper_values():
    paper = resolve(TrainDecoderConfig, preset="decoder-xl_dinov2-b")
    t, loss, disc = paper.train, paper.loss, paper.disc
    assert (paper.rae.encoder, paper.rae.decoder, paper.rae.noise_tau, paper.rae.stats) == (
        "dinov2-b", "ViT-XL", 0.8, None)
    assert (t.epochs, t.global_batch_size, t.lr, t.final_lr, t.betas, t.weight_decay, t.ema_decay) == (
        16, 512, 2e-4, 2e-5, [0.9, 0.95], 0.0, 0.9978)
    assert (t.schedule, t.warmup_epochs, t.warmup_from_zero) == ("cosine", 1, True)
    assert (loss.perceptual_weight, loss.lpips_start, loss.disc_weight, loss.disc_upd_start, loss.disc_start,
            loss.max_d_weight, loss.disc_loss, loss.gen_loss) == (1.0, 0, 0.75, 6, 8, 1e4, "hinge", "vanilla")
    assert (disc.lr, disc.final_lr, disc.betas, disc.aug_prob, disc.aug_cutout, disc.ks, disc.key_depths) == (
        2e-4, 2e-5, [0.9, 0.95], 1.0, 0.0, 9, [2, 5, 8, 11])
    assert not (paper.rae.encoder_random_init or paper.disc.random_init or paper.loss.lpips_random_init)
    one = resolve(TrainDecoderConfig, preset="decoder-xl_dinov2-b-1gpu")
    assert one.train.global_batch_size == 512 and 512 % one.train.micro_batch_size == 0
    assert one.train.micro_batch_size < 512 and one.train.precision == "bf16" and one.train.grad_checkpointing
    differ = {f"{s}.{k}" for s in ("rae", "train", "loss", "disc")
              for k, v in vars(getattr(one, s)).items() if getattr(getattr(paper, s), k) != v}
    assert differ == {"train.micro_batch_size", "train.precision", "train.grad_checkpointing"}
    tiny = resolve(TrainDecoderConfig, preset="tiny")
    assert tiny.disc.random_init and not tiny.loss.lpips_random_init  # LPIPS random init only when asked
    assert tiny.loss.disc_upd_start == tiny.loss.disc_start == tiny.loss.lpips_start == 0


def test_dry_run_prints_the_resolved_config(tmp_path):
    result = CliRunner().invoke(app, ["train-decoder", str(tmp_path), "--out", str(tmp_path / "o"), "-p", "tiny",
                                      "--dry-run", "train.lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.001" in result.output and f"path: {tmp_path}" in result.output
    assert not (tmp_path / "o").exists()


def test_training_with_latent_stats_carries_them_into_the_export(runs, tmp_path):
    """rae.stats (e.g. from cache-latents) may be set; the export's rae.yaml then normalises with the same file."""
    from rae_cli.build import build_rae
    from rae_cli.latent_stats import save_stats
    from rae_cli.schema import RAEConfig

    g = torch.Generator().manual_seed(0)
    stats = tmp_path / "stats.safetensors"
    save_stats(stats, torch.randn(32, 4, 4, generator=g), torch.rand(32, 4, 4, generator=g) + 0.5, count=100)
    cfg = _cfg(runs["images"], f"rae.stats={stats}", "loss.perceptual_weight=0", "train.epochs=0.5")
    result = train_decoder(cfg=cfg, out_dir=tmp_path / "run")
    assert result.step == 1
    rae_cfg = resolve(RAEConfig, preset=str(tmp_path / "run" / "export" / "rae.yaml"))
    assert rae_cfg.stats == str(stats)
    rae = build_rae(rae_cfg)
    assert rae.latent_mean is not None and rae.latent_var is not None
    _assert_same_state(rae.decoder.state_dict(), result.ema_decoder.state_dict(), "decoder built from rae.yaml")
