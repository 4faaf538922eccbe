"""``parallel=fsdp`` (FSDP2 on 2 gloo processes, CPU): the same training and the same checkpoints as DDP.

A checkpoint is the full state either way, so runs move freely between FSDP, DDP and one process on resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import synthetic_cache
from rae_cli.config import resolve
from rae_cli.train_dit import TrainDiTConfig, train_dit

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["max_steps=3", "ckpt_every_steps=2"]

# train-dit under FSDP, recording when FSDP's gradient synchronisation is switched off and on again.
DIT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from torch.distributed.fsdp import FSDPModule
    from rae_cli.config import resolve
    from rae_cli.train_dit import TrainDiTConfig, train_dit

    calls, original = [], FSDPModule.set_requires_gradient_sync
    def recording(self, requires, *args, **kwargs):
        calls.append(bool(requires))
        return original(self, requires, *args, **kwargs)
    FSDPModule.set_requires_gradient_sync = recording
    out, overrides = sys.argv[1], sys.argv[2:]
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=["parallel=fsdp", *overrides]), out_dir=out)
    if os.environ["RANK"] == "0":
        from torch._dynamo.utils import counters

        open(os.path.join(out, "sync_calls.json"), "w").write(json.dumps(calls))
        open(os.path.join(out, "dynamo_graphs.json"), "w").write(json.dumps(counters["stats"]["unique_graphs"]))
""")


def torchrun(tmp_path: Path, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    target = ["-m", "rae_cli"]
    if script is not None:
        (tmp_path / "fsdp_script.py").write_text(script)
        target = [str(tmp_path / "fsdp_script.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_process(cache: Path, out: Path, *overrides: str) -> None:
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", *overrides]), out_dir=out)


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def same_checkpoint(a: Path, b: Path, *, atol: float) -> None:
    """Model, EMA and optimizer state of two checkpoint folders agree (same keys, same layout, close values)."""
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=atol, msg=f"{name}:{k}")
    oa, ob = (torch.load(p / "resume.pt", map_location="cpu", weights_only=False)["optimizer"] for p in (a, b))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, ob["state"][i][k], rtol=1e-5, atol=atol, msg=f"optimizer {i}.{k}")


def test_fsdp_matches_ddp_and_one_process_and_its_checkpoint_resumes_on_one(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    one_process(cache, tmp_path / "one", *OVERRIDES)
    # global batch 8 = 2 processes × 2 micro-batches × 2 samples: gradient accumulation on top of both wrappers.
    torchrun(tmp_path, "train-dit", "-p", "tiny", "--cache", str(cache), "--out", str(tmp_path / "ddp"), *OVERRIDES,
             "grad_accum_steps=2")
    torchrun(tmp_path, str(tmp_path / "fsdp"), f"cache={cache}", *OVERRIDES, "grad_accum_steps=2", script=DIT_SCRIPT)

    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    for step in ("step-000000002", "step-000000003"):
        same_checkpoint(tmp_path / "fsdp/checkpoints" / step, tmp_path / "ddp/checkpoints" / step, atol=1e-6)
    # No reduce-scatter on the first micro-batch of each step: sync off, then on again for the last one.
    assert json.loads((tmp_path / "fsdp/sync_calls.json").read_text()) == [False, True] * 3

    # The FSDP run resumes on one process (parallel may change on resume) exactly like the one-process run.
    one_process(cache, tmp_path / "fsdp", "max_steps=4", "ckpt_every_steps=2", "grad_accum_steps=2",
                "parallel=ddp")
    one_process(cache, tmp_path / "one", "max_steps=4", "ckpt_every_steps=2")
    same_checkpoint(tmp_path / "fsdp/checkpoints/step-000000004", tmp_path / "one/checkpoints/step-000000004",
                    atol=1e-5)


def test_one_process_run_resumes_under_fsdp_and_fsdp_resumes_fsdp(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    one_process(cache, tmp_path / "ref", "max_steps=4", "ckpt_every_steps=2")  # uninterrupted
    one_process(cache, tmp_path / "run", "max_steps=2", "ckpt_every_steps=2")
    for stop in (3, 4):  # 1 process → FSDP, then an interrupted FSDP run resumed under FSDP
        torchrun(tmp_path, "train-dit", "-p", "tiny", "--cache", str(cache), "--out", str(tmp_path / "run"),
                 f"max_steps={stop}", "ckpt_every_steps=2", "parallel=fsdp", "keep_last=5")
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)
    assert len(losses(tmp_path / "run")) == 4
    same_checkpoint(tmp_path / "run/checkpoints/step-000000004", tmp_path / "ref/checkpoints/step-000000004",
                    atol=1e-5)



def test_compiled_fsdp_trains_like_eager_one_process(tmp_path):
    # compile=true on a fully_shard-ed model: dynamo traces through (or breaks at) FSDP2's hooks; the training must
    # stay the same: losses and checkpoints equal the eager one-process run, the gradient-sync switch still flips.
    cache = synthetic_cache(tmp_path / "cache")
    one_process(cache, tmp_path / "one", *OVERRIDES)
    torchrun(tmp_path, str(tmp_path / "fsdp"), f"cache={cache}", *OVERRIDES, "grad_accum_steps=2", "compile=true",
             script=DIT_SCRIPT)
    assert len(losses(tmp_path / "fsdp")) == 3
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    same_checkpoint(tmp_path / "fsdp/checkpoints/step-000000003", tmp_path / "one/checkpoints/step-000000003",
                    atol=1e-5)
    assert json.loads((tmp_path / "fsdp/sync_calls.json").read_text()) == [False, True] * 3
    assert json.loads((tmp_path / "fsdp/dynamo_graphs.json").read_text()) > 0  # it really went through dynamo


DECODER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from torch.distributed.fsdp import FSDPModule
    from rae_cli.config import resolve
    from rae_cli.train_decoder import TrainDecoderConfig, train_decoder

    calls, original = [], FSDPModule.set_requires_gradient_sync
    def recording(self, requires, *args, **kwargs):
        calls.append(bool(requires))
        return original(self, requires, *args, **kwargs)
    FSDPModule.set_requires_gradient_sync = recording
    images, out, parallel = sys.argv[1:4]
    cfg = resolve(TrainDecoderConfig, preset="tiny", overrides=[
        f"data.path={images}", f"train.parallel={parallel}", "loss.perceptual_weight=0", "train.log_every=1",
        "train.micro_batch_size=1",  # 4 = 2 processes × 1 image × 2 accumulation steps
        "train.epochs=1", "train.clip_grad=1.0"])
    train_decoder(cfg=cfg, out_dir=out)
    if os.environ["RANK"] == "0":
        open(os.path.join(out, "sync_calls.json"), "w").write(json.dumps(calls))
""")


def test_train_decoder_fsdp_matches_ddp(tmp_path):
    from test_train_decoder_ddp import _write_images

    _write_images(tmp_path / "images")
    for parallel in ("ddp", "fsdp"):
        torchrun(tmp_path, str(tmp_path / "images"), str(tmp_path / parallel), parallel, script=DECODER_SCRIPT)
    rows = {p: [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
            for p in ("ddp", "fsdp")}
    assert [r.keys() for r in rows["fsdp"]] == [r.keys() for r in rows["ddp"]]
    trained = [r for r in rows["fsdp"] if "loss" in r]
    assert len(trained) == 2 and all("d_weight" in r and "d_loss" in r for r in trained)  # GAN on: G and D train
    for a, b in zip(rows["fsdp"], rows["ddp"]):  # losses, adaptive weight, grad norm, eval PSNR/SSIM (not speed)
        a, b = ({k: v for k, v in r.items() if not k.endswith("per_s")} for r in (a, b))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # The decoder's first micro-batch of each step accumulates without reduce-scatter (accumulation_context).
    assert json.loads((tmp_path / "fsdp/sync_calls.json").read_text()) == [False, True] * 2
    assert json.loads((tmp_path / "ddp/sync_calls.json").read_text()) == []
    last = sorted((tmp_path / "ddp/checkpoints").glob("step-*"))[-1].name
    for name in ("decoder", "ema", "disc"):
        a = load_file(str(tmp_path / "fsdp/checkpoints" / last / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "ddp/checkpoints" / last / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")


def test_parallel_setting_is_checked_resumable_and_plain_on_one_process(tmp_path):
    from rae_cli.config import ConfigError
    from rae_cli.train_decoder import TrainDecoderConfig
    from rae_cli.training.resume import RESUMABLE_KEYS

    with pytest.raises(ConfigError, match="parallel must be ddp or fsdp, not 'zero3'"):
        resolve(TrainDiTConfig, preset="tiny", overrides=["parallel=zero3"])
    with pytest.raises(ConfigError, match="train.parallel must be ddp or fsdp"):
        resolve(TrainDecoderConfig, preset="tiny", overrides=["train.parallel=fdsp"])
    with pytest.raises(ConfigError, match="objective=meanflow is not supported with parallel=fsdp"):
        resolve(TrainDiTConfig, preset="tiny", overrides=["parallel=fsdp", "objective=meanflow",
                                                          "dit.second_time=interval"])
    assert {"parallel", "train.parallel"} <= RESUMABLE_KEYS
    # One process: nothing to shard, parallel=fsdp trains exactly as the default.
    cache = synthetic_cache(tmp_path / "cache")
    one_process(cache, tmp_path / "ddp", "max_steps=1")
    one_process(cache, tmp_path / "fsdp", "max_steps=1", "parallel=fsdp")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / p / "checkpoints/step-000000001" / name)) for p in ("ddp", "fsdp"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_agrees_across_fsdp_ranks(tmp_path, monkeypatch):
    # Only rank 1's slice of the weights goes non-finite at step 3: rank 0 gathers the whole state, finds it, and
    # the all-reduced verdict stops both ranks before that save.
    cache = synthetic_cache(tmp_path / "cache")
    monkeypatch.setenv("RAE_FAULT_INJECT", "nan:weights@3")
    monkeypatch.setenv("RAE_FAULT_INJECT_RANK", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rae_cli",
           "train-dit", "-p", "tiny", "--cache", str(cache), "--out", str(tmp_path / "run"), "max_steps=4",
           "ckpt_every_steps=100", "ckpt_every_minutes=1e-6", "keep_last=5", "parallel=fsdp"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "step 3: the weights about to be saved are not finite" in res.stdout + res.stderr
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step-*")) == ["step-000000001",
                                                                                    "step-000000002"]
