"""train-dit on the tiny preset (CPU): bit-identical resume, loss regression, NaN guard, schedules, EMA, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import synthetic_cache
from rae_cli.config import resolve
from rae_cli.train_dit import NonFiniteError, TrainDiTConfig, train_dit


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "cache")


def run(cache: Path, out: Path, *overrides: str):
    cfg = resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", *overrides])
    return train_dit(cfg=cfg, out_dir=out)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_files(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs"


def test_resume_is_bit_identical(cache, tmp_path):
    # grad_accum_steps=2 exercises accumulation; step 2 is mid-epoch (4 steps per epoch).
    one = run(cache, tmp_path / "one", "max_steps=4", "grad_accum_steps=2")
    run(cache, tmp_path / "two", "max_steps=2", "grad_accum_steps=2")
    assert (tmp_path / "two/checkpoints/step-000000002").is_dir()
    two = run(cache, tmp_path / "two", "max_steps=4", "grad_accum_steps=2")  # same folder → resumes at step 2
    assert one.name == two.name == "step-000000004"
    assert_same_files(one, two)
    assert losses(tmp_path / "one") == losses(tmp_path / "two")  # no duplicated or missing metric lines
    opt_one = torch.load(one / "resume.pt", weights_only=True)["optimizer"]["state"]
    opt_two = torch.load(two / "resume.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_one[i]["exp_avg_sq"], opt_two[i]["exp_avg_sq"]) for i in opt_one)


# Loss per step of the tiny preset on the synthetic cache (seed 42). These values change only with a deliberate
# change to the model, flow, optimizer or data order: update them together with a CHANGELOG line.
EXPECTED_LOSSES = [1.9686062335968018, 1.9490679502487183, 2.02858567237854, 1.9928858280181885]


def test_loss_regression(cache, tmp_path):
    run(cache, tmp_path / "r", "max_steps=4")
    got = losses(tmp_path / "r")
    assert len(got) == 4
    assert got == pytest.approx(EXPECTED_LOSSES, rel=1e-5), got


def test_grad_accumulation_matches_one_big_batch(cache, tmp_path):
    a = run(cache, tmp_path / "a", "max_steps=2", "grad_accum_steps=1")
    b = run(cache, tmp_path / "b", "max_steps=2", "grad_accum_steps=4")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_checkpointing_workers_and_bf16_variants(cache, tmp_path):
    a = run(cache, tmp_path / "a", "max_steps=2")
    b = run(cache, tmp_path / "b", "max_steps=2", "dit.grad_checkpointing=true")  # recomputes, same numbers
    assert_same_files(a, b)
    w = run(cache, tmp_path / "w", "max_steps=2", "num_workers=2")  # batches are a function of the step alone
    assert_same_files(a, w)
    run(cache, tmp_path / "c", "max_steps=2", "precision=bf16")
    bf16 = losses(tmp_path / "c")
    assert all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(losses(tmp_path / "a"), rel=0.05)  # same draws, bf16 matmuls


def test_nan_guard_stops_and_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setenv("RAE_FAULT_INJECT", "nan:loss@4")  # step 4's loss is NaN (before its optimizer step)
    with pytest.raises(NonFiniteError, match=r"step 4: the loss is nan.*\(step 2\); it is kept"):
        run(cache, out, "max_steps=6", "ckpt_every_steps=2")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000000002"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    monkeypatch.delenv("RAE_FAULT_INJECT")
    good = load_file(str(out / "checkpoints/step-000000002/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    final = run(cache, out, "max_steps=6", "ckpt_every_steps=2")  # the same command resumes from step 2
    assert final.name == "step-000000006"


def test_a_non_finite_state_is_never_saved(cache, tmp_path, monkeypatch):
    # A blow-up that reaches the weights while the step's loss was still finite (caught one step late before):
    # the check before the save stops the run and keeps step 2 as the last good checkpoint.
    out = tmp_path / "w"
    monkeypatch.setenv("RAE_FAULT_INJECT", "nan:weights@4")
    with pytest.raises(NonFiniteError, match=r"step 4: the weights about to be saved are not finite.*\(step 2\)"):
        run(cache, out, "max_steps=6", "ckpt_every_steps=2")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000000002"]
    monkeypatch.delenv("RAE_FAULT_INJECT")
    # For real: lr = 1e39 overflows the first AdamW update to ±inf, while the first loss is finite.
    with pytest.raises(NonFiniteError, match=r"step 1: the weights .* not finite .*no checkpoint had been saved"):
        run(cache, tmp_path / "lr", "max_steps=2", "ckpt_every_steps=1", "optim.lr=1e39", "schedule.kind=constant")
    assert not list((tmp_path / "lr" / "checkpoints").glob("step-*"))


def test_checkpoint_folder_is_self_describing(cache, tmp_path):
    from rae_cli.train_dit import load_trained_dit

    ck = run(cache, tmp_path / "s", "max_steps=1")
    model, cfg = load_trained_dit(tmp_path / "s")
    assert cfg.num_classes == 4 and cfg.latent_shape == [32, 4, 4]
    assert cfg.flow.shift == 1.0
    assert Path(cfg.rae.stats) == ck / "latent_stats.safetensors"  # the run's own copy of the stats it used
    assert load_file(str(ck / "latent_stats.safetensors")).keys() == load_file(str(cache / "stats.safetensors")).keys()
    ema = load_file(str(ck / "ema.safetensors"))
    assert ema.keys() == model.state_dict().keys()  # the model's own (official) key names
    assert "t_embedder.W" in ema and "enc_feat_rope.freqs_cos" in ema
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 1 and meta["classes"] == ["c0", "c1", "c2", "c3"]
    assert meta["latent_stats"]["source"] == str((cache / "stats.safetensors").resolve())
    assert len(meta["latent_stats"]["sha256"]) == 64 and meta["rae_identity"]["latent_shape"] == [32, 4, 4]
    assert (tmp_path / "s/checkpoints/latest").read_text().strip() == ck.name


def test_ema_starts_equal_and_follows_the_formula():
    from rae_cli.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters()))
    old = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, o, p in zip(ema.module.parameters(), old, model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_official_linear_schedule_and_cosine():
    from rae_cli.lr_schedule import lr_at

    kw = dict(kind="linear", base_lr=2e-4, final_lr=2e-5, warmup=40, decay_end=800, total=1400)
    assert lr_at(0, **kw) == 2e-4 and lr_at(39, **kw) == 2e-4  # "warmup" without ramp = constant
    assert lr_at(420, **kw) == pytest.approx(1.1e-4)  # halfway down the decay
    assert lr_at(800, **kw) == pytest.approx(2e-5) and lr_at(1399, **kw) == pytest.approx(2e-5)
    assert lr_at(9, **{**kw, "warmup_from_zero": True}) == pytest.approx(2e-4 * 10 / 40)
    cos = dict(kind="cosine", base_lr=1.0, final_lr=0.0, warmup=0, total=100)
    assert lr_at(0, **cos) == 1.0 and lr_at(50, **cos) == pytest.approx(0.5) and lr_at(100, **cos) == 0.0
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_at(0, kind="step", base_lr=1.0)


def test_retention_keeps_last_and_every(tmp_path):
    from rae_cli.run_dir import apply_retention, clean_temporary, latest_checkpoint, list_checkpoints, save_checkpoint

    root = tmp_path / "checkpoints"
    for step in range(1, 8):
        save_checkpoint(root, step, weights={"model": {"w": torch.full((2,), float(step))}},
                        resume_state={"step": step, "nested": {"t": torch.ones(1), "l": [1, 2]}})
        apply_retention(root, keep_last=2, keep_every=3)
    assert [c.step for c in list_checkpoints(root)] == [3, 6, 7]
    last = latest_checkpoint(root)
    assert last.step == 7 and last.weights("model")["w"].tolist() == [7.0, 7.0]
    assert last.resume_state()["nested"]["l"] == [1, 2]  # loads with weights_only=True
    (root / ".tmp-step-000000009-1").mkdir()  # an interrupted save is not a checkpoint
    assert latest_checkpoint(root).step == 7
    # A crash between the two renames of a replaced checkpoint leaves it as .old-*: it is put back.
    (root / "step-000000007").rename(root / ".old-step-000000007-1")
    clean_temporary(root)
    assert [c.step for c in list_checkpoints(root)] == [3, 6, 7]
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_train_dit_cli_errors_are_clear(cache, tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from rae_cli.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, ["train-dit", "-p", "tiny", "--out", str(tmp_path / "x"), *args])

    res = invoke()
    assert res.exit_code == 2 and "--cache DIR" in res.output
    res = invoke("bogus=1")
    assert res.exit_code == 2 and "unknown config key 'bogus'" in res.output
    res = invoke("--cache", str(cache), "--data", str(cache))
    assert res.exit_code == 2 and "not both" in res.output
    res = invoke("--cache", str(cache), "global_batch_size=64")  # 32 images
    assert res.exit_code == 2 and "larger than the data" in res.output
    res = invoke("--cache", str(cache), "rae.encoder_input_size=28")
    assert res.exit_code == 2 and "different encoder" in res.output
    if importlib.util.find_spec("tensorboard") is None:
        res = invoke("--cache", str(cache), "tensorboard=true")
        assert res.exit_code == 2 and "pip install tensorboard" in res.output
    assert not (tmp_path / "x" / "checkpoints").exists()
