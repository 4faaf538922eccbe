"""MeanFlow end to end on the tiny presets (CPU): train-dit objective=meanflow (scratch and distilled), bit-identical
resume, rae sample method=meanflow (1 and 2 steps, batch-size independent, NFE), clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dit_training_helpers import synthetic_cache
from rae_cli.cli import app
from rae_cli.config import resolve
from rae_cli.config import ConfigError
from rae_cli.train_dit import TrainDiTConfig, train_dit

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("mf_cache") / "cache")


def run(cache: Path, out: Path, *overrides: str, preset="tiny-meanflow"):
    cfg = resolve(TrainDiTConfig, preset=preset, overrides=[f"cache={cache}", *overrides])
    return train_dit(cfg=cfg, out_dir=out)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"rae {' '.join(map(str, args))}:\n{result.output}\n{result.exception!r}"
    return result


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_meanflow_training_resumes_bit_identically(cache, tmp_path):
    one = run(cache, tmp_path / "one", "max_steps=4", "grad_accum_steps=2")
    run(cache, tmp_path / "two", "max_steps=2", "grad_accum_steps=2")
    two = run(cache, tmp_path / "two", "max_steps=4", "grad_accum_steps=2")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert any(k.startswith("r_embedder.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    values = losses(tmp_path / "one")
    assert values == losses(tmp_path / "two") and len(values) == 4 and all(np.isfinite(values))
    # the r_embedder output layer has left zero: the second time is being learnt
    assert load_file(str(one / "model.safetensors"))["r_embedder.mlp.2.weight"].abs().max() > 0


def test_distillation_from_a_flow_teacher_then_one_and_two_step_sampling(cache, tmp_path):
    teacher = tmp_path / "flow"
    run(cache, teacher, "max_steps=2", preset="tiny")
    # init: teacher → the student starts as the teacher, with a zero r_embedder output (lr 0: one step changes nothing)
    ck = run(cache, tmp_path / "mf0", "max_steps=1", f"teacher={teacher}", "optim.lr=0", "schedule.final_lr=0")
    t_ema = load_file(str(teacher / "checkpoints/step-000000002/ema.safetensors"))
    s_ema = load_file(str(ck / "ema.safetensors"))
    assert all(torch.equal(t_ema[k], s_ema[k]) for k in t_ema)
    assert s_ema["r_embedder.mlp.2.weight"].abs().max() == 0
    mf = tmp_path / "mf"
    run(cache, mf, "max_steps=2", f"teacher={teacher}", "meanflow.guidance_scale=1.5")
    assert len(losses(mf)) == 2 and all(np.isfinite(losses(mf)))

    common = ["-p", "tiny", f"checkpoint={mf}", "method=meanflow", "num_images=5"]
    a = invoke("sample", "--out", tmp_path / "s1", *common, "num_steps=1", "batch_size=5")
    info = json.loads((tmp_path / "s1/sample_info.json").read_text())
    assert info["network_evaluations_per_image"]["main"] == 1.0 and info["time_grid"] == [1.0, 0.0]
    invoke("sample", "--out", tmp_path / "s1b", *common, "num_steps=1", "batch_size=2")
    x1 = np.load(tmp_path / "s1/samples.npz")["arr_0"]
    assert x1.shape[0] == 5 and np.array_equal(x1, np.load(tmp_path / "s1b/samples.npz")["arr_0"])
    for n in (1, 2):  # latents (the tiny random decoder + uint8 may hide small differences)
        invoke("sample", "--out", tmp_path / f"l{n}", *common, f"num_steps={n}", "decode=false")
    info2 = json.loads((tmp_path / "l2/sample_info.json").read_text())
    assert info2["network_evaluations_per_image"]["main"] == 2.0 and len(info2["time_grid"]) == 3
    l1, l2 = (load_file(str(tmp_path / f"l{n}/latents.safetensors"))["latents"] for n in (1, 2))
    assert l1.shape == (5, 32, 4, 4) and torch.isfinite(l1).all() and not torch.equal(l1, l2)
    assert a.exit_code == 0


def test_consistency_stage_runs_and_meanflow_errors_are_clear(cache, tmp_path):
    teacher = tmp_path / "flow"
    run(cache, teacher, "max_steps=1", preset="tiny")
    run(cache, tmp_path / "cmt", "max_steps=1", f"teacher={teacher}", "meanflow.stage=consistency",
        "meanflow.consistency_ode_steps=3", "meanflow.derivative=finite-difference")
    assert np.isfinite(losses(tmp_path / "cmt")).all()
    with pytest.raises(ConfigError, match="second_time"):
        resolve(TrainDiTConfig, preset="tiny", overrides=["objective=meanflow"])
    with pytest.raises(ConfigError, match="teacher"):
        run(cache, tmp_path / "no_teacher", "max_steps=1", "meanflow.stage=consistency")
    r = runner.invoke(app, ["sample", "-p", "tiny", "--out", str(tmp_path / "x"), f"checkpoint={teacher}",
                            "method=meanflow", "num_steps=1"])
    assert r.exit_code == 2 and "MeanFlow model" in r.output
    r = runner.invoke(app, ["sample", "-p", "tiny", "--out", str(tmp_path / "y"), f"checkpoint={teacher}",
                            "method=meanflow", "num_steps=1", "guidance.method=cfg", "guidance.scale=2"])
    assert r.exit_code == 2 and "folded" in r.output
