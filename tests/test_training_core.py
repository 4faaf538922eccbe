"""The shared training core (rae_cli/training) through both trainers on the tiny presets (CPU): one resume policy,
a failed start is not a run, ``max_steps=0`` is refused, time-based checkpoints, self-contained stage-2 runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dit_training_helpers import image_folder, synthetic_cache
from rae_cli.cli.app import app
from rae_cli.config import ConfigError, resolve
from rae_cli.train_dit import TrainDiTConfig, train_dit
from rae_cli.training.resume import RESUMABLE_KEYS, changed_keys, check_resume


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "cache")


def run(cache: Path, out: Path, *overrides: str):
    return train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", *overrides]), out_dir=out)


def steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------------------------------------- resume policy


def test_policy_lists_and_compares_dotted_keys(tmp_path):
    old = {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "num_workers": 0, "rae_version": "0.1"}
    assert changed_keys(old, {**old, "optim": {"lr": 1e-3, "betas": (0.9, 0.95)}}) == []  # tuple == list
    assert changed_keys(old, {**old, "new_key": 1}) == []  # a setting added later is not a change
    assert check_resume(old, {**old, "num_workers": 4}, tmp_path) == ["num_workers"]
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 → 0\.01.*new --out.*optim\.lr=0\.001"):
        check_resume(old, {**old, "optim": {"lr": 1e-2, "betas": [0.9, 0.95]}}, tmp_path)
    for key in ("grad_accum_steps", "train.micro_batch_size", "data.path", "cache", "images", "max_steps",
                "train.stop_after", "dit.grad_checkpointing", "train.grad_checkpointing", "ckpt_every_minutes"):
        assert key in RESUMABLE_KEYS
    for key in ("optim.lr", "seed", "global_batch_size", "train.lr", "train.seed", "epochs", "precision"):
        assert key not in RESUMABLE_KEYS


def test_train_dit_allowed_change_resumes_forbidden_is_refused(cache, tmp_path):
    out = tmp_path / "run"
    run(cache, out, "max_steps=2", "ckpt_every_steps=1")
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 → 0\.002.*may not change"):
        run(cache, out, "max_steps=4", "optim.lr=2e-3")
    assert steps(out) == [1, 2]  # nothing was touched
    # Allowed on resume: micro-batching, workers, logging, saving, stopping (grad_accum_steps keeps the numbers).
    final = run(cache, out, "max_steps=4", "grad_accum_steps=2", "num_workers=1", "log_every=2", "keep_last=3")
    assert final.name == "step-000000004"
    ref = run(cache, tmp_path / "ref", "max_steps=4")
    a, b = load_file(str(final / "ema.safetensors")), load_file(str(ref / "ema.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cli_refusal_is_one_line_rc2(cache, tmp_path):
    out = tmp_path / "run"
    res = cli("train-dit", "-p", "tiny", "--cache", cache, "--out", out, "max_steps=1")
    assert res.exit_code == 0, res.output
    res = cli("train-dit", "-p", "tiny", "--out", out, "max_steps=2", "seed=7")  # --cache reused from the run
    assert res.exit_code == 2 and "seed: 42 → 7" in res.output and "--out" in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.strip()]) <= 3  # one message (rich may wrap)


def test_a_start_that_failed_before_step_1_is_not_a_run(cache, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(Exception, match="nope.safetensors"):
        run(cache, out, "max_steps=1", f"stats={missing}")  # fails before step 1 ...
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text("seed: 1\noptim: {lr: 0.5}\n")  # ... leaving (some) config.yaml behind
    ck = run(cache, out, "max_steps=1")  # the corrected command starts afresh instead of being refused
    assert ck.name == "step-000000001"


def test_train_decoder_failed_start_then_corrected_command(tmp_path):
    images = image_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "dec"
    base = ["train-decoder", images, "--out", out, "-p", "tiny", "train.stop_after=1"]
    res = cli(*base, f"loss.lpips_weights={tmp_path / 'vgg16.pth'}")  # missing VGG weights: fails at start-up
    assert res.exit_code == 2 and "vgg16.pth" in res.output
    assert (out / "config.yaml").is_file() and not list(out.glob("checkpoints/step-*"))
    res = cli(*base, "loss.lpips_random_init=true")
    assert res.exit_code == 0, res.output
    assert steps(out) == [1]
    res = cli(*base, "loss.lpips_random_init=true", "train.lr=1e-3")
    assert res.exit_code == 2 and "train.lr" in res.output


def test_max_steps_zero_is_a_clear_error(cache, tmp_path):
    res = cli("train-dit", "-p", "tiny", "--cache", cache, "--out", tmp_path / "z", "max_steps=0")
    assert res.exit_code == 2 and "max_steps=0 trains nothing" in res.output
    assert not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------- time-based saves


def test_checkpoint_every_minutes(cache, tmp_path):
    out = tmp_path / "t"
    # Step interval 100: only the clock (1e-6 minutes ≈ every step) and the last step save.
    run(cache, out, "max_steps=3", "ckpt_every_steps=100", "ckpt_every_minutes=1e-6", "keep_last=5")
    assert steps(out) == [1, 2, 3]
    out2 = tmp_path / "t2"
    run(cache, out2, "max_steps=3", "ckpt_every_steps=100", "ckpt_every_minutes=60", "keep_last=5")
    assert steps(out2) == [3]
    res = cli("train-dit", "-p", "tiny", "--cache", cache, "--out", tmp_path / "x", "ckpt_every_minutes=0")
    assert res.exit_code == 2 and "ckpt_every_minutes" in res.output


def test_train_decoder_checkpoint_every_minutes(tmp_path):
    images = image_folder(tmp_path / "images", per_class=4)
    res = cli("train-decoder", images, "--out", tmp_path / "d", "-p", "tiny", "loss.lpips_random_init=true",
              "train.stop_after=2", "train.ckpt_every=100", "train.ckpt_every_minutes=1e-6", "train.keep_last=5")
    assert res.exit_code == 0, res.output
    assert steps(tmp_path / "d") == [1, 2]


def test_clock_decision_is_broadcast_from_rank_0(monkeypatch):
    from rae_cli.distributed import Dist
    from rae_cli.training.clock import CheckpointClock

    sent = []

    def fake_broadcast(t, src):  # what rank 0's clock says wins, whatever this rank's clock says
        sent.append(src)
        t.fill_(0.0)

    monkeypatch.setattr(torch.distributed, "broadcast", fake_broadcast)
    clock = CheckpointClock(None, 1e-9, Dist(rank=1, world_size=2))
    assert clock.due(1) is False and sent == [0]
    assert clock.due(2, last=True) is True


# ---------------------------------------------------------------------------------------------- self-contained runs


def test_sample_works_after_the_cache_is_deleted(tmp_path):
    images = image_folder(tmp_path / "images", per_class=4)
    cache = tmp_path / "cache"
    res = cli("cache-latents", images, "--out", cache, "-p", "tiny")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    res = cli("train-dit", "-p", "tiny", "--cache", cache, "--out", run_dir, "max_steps=2", "global_batch_size=4")
    assert res.exit_code == 0, res.output
    ck = run_dir / "checkpoints" / "step-000000002"
    ref = load_file(str(cache / "stats.safetensors"))
    own = load_file(str(ck / "latent_stats.safetensors"))
    assert own.keys() == {"mean", "var"} and all(torch.equal(own[k], ref[k]) for k in own)
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["rae_identity"]["encoder"] == "dinov2-b" and meta["rae_identity"]["latent_shape"] == [32, 4, 4]

    moved = tmp_path / "cache-moved"
    shutil.move(str(cache), str(moved))  # (deleting it is the same for sampling: nothing points into it)
    sample = ["sample", "-p", "tiny", f"checkpoint={run_dir}", "num_images=2", "grid_images=0"]
    res = cli(*sample, "--out", tmp_path / "s1")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s1" / "images").glob("*.png"))) == 2
    # Another autoencoder section naming no statistics (rae=PRESET, e.g. a second decoder of the same encoder)
    # decodes with the checkpoint's own: here the same preset the run used, so the very same images.
    res = cli(*sample, "rae=tiny", "--out", tmp_path / "s1b")
    assert res.exit_code == 0, res.output
    for a in sorted((tmp_path / "s1" / "images").glob("*.png")):
        assert a.read_bytes() == (tmp_path / "s1b" / "images" / a.name).read_bytes()
    shutil.rmtree(moved)

    # A rebuilt cache with other statistics: passing them is refused, unless explicitly allowed.
    other = image_folder(tmp_path / "images2", per_class=4, seed=5)
    res = cli("cache-latents", other, "--out", tmp_path / "cache2", "-p", "tiny")
    assert res.exit_code == 0, res.output
    stats2 = tmp_path / "cache2" / "stats.safetensors"
    res = cli(*sample, f"rae.stats={stats2}", "--out", tmp_path / "s2")
    assert res.exit_code == 2 and "differ from the ones" in res.output and "allow_stats_mismatch" in res.output
    res = cli(*sample, f"rae.stats={stats2}", "allow_stats_mismatch=true", "--out", tmp_path / "s3")
    assert res.exit_code == 0, res.output
    # ... and resuming training on the rebuilt cache is refused too (the model was trained on other statistics).
    res = cli("train-dit", "-p", "tiny", "--cache", tmp_path / "cache2", "--out", run_dir, "max_steps=3",
              "global_batch_size=4")
    assert res.exit_code == 2 and "latent statistics" in res.output


def test_older_checkpoint_without_its_own_stats_still_loads(cache, tmp_path, caplog):
    from rae_cli.stage2_loading import checkpoint_base

    ck = run(cache, tmp_path / "old", "max_steps=1")
    (ck / "latent_stats.safetensors").unlink()  # as written before this version: stats only as a path
    meta = json.loads((ck / "meta.json").read_text())
    meta.pop("latent_stats"), meta.pop("rae_identity")
    (ck / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_base(str(ck))["rae"]["stats"] == str((cache / "stats.safetensors").resolve())
    cfg_text = (ck / "config.yaml").read_text().replace(str((cache / "stats.safetensors").resolve()),
                                                         str(tmp_path / "gone" / "stats.safetensors"))
    (ck / "config.yaml").write_text(cfg_text)
    with caplog.at_level("WARNING"):
        base = checkpoint_base(str(ck))
    assert base["rae"]["stats"].endswith("gone/stats.safetensors")
    assert "pass rae.stats=" in caplog.text


# ---------------------------------------------------------------------------------------------- the NaN guard


@pytest.mark.parametrize("fault, message", [("nan:loss@2", r"step 2: the loss is nan"),
                                            ("nan:weights@2", r"step 2: the weights about to be saved are not")])
def test_train_decoder_nan_guard_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fault, message):
    from rae_cli.train_decoder import TrainDecoderConfig, train_decoder
    from rae_cli.training.guard import NonFiniteError

    images = image_folder(tmp_path / "images", per_class=4)
    cfg = resolve(TrainDecoderConfig, preset="tiny", overrides=[f"data.path={images}", "loss.perceptual_weight=0",
                                                                "train.ckpt_every=1", "train.keep_last=5"])
    monkeypatch.setenv("RAE_FAULT_INJECT", fault)
    with pytest.raises(NonFiniteError, match=message + r".*step-000000001 \(step 1\); it is kept"):
        train_decoder(cfg=cfg, out_dir=tmp_path / "run")
    assert steps(tmp_path / "run") == [1]
    good = load_file(str(tmp_path / "run/checkpoints/step-000000001/decoder.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
