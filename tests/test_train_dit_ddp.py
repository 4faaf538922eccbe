"""train-dit under torchrun: 2 gloo processes match 1 process with the same global batch (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import synthetic_cache
from rae_cli.config import resolve
from rae_cli.train_dit import TrainDiTConfig, train_dit

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rae_cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_process(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    overrides = ["max_steps=3", "ckpt_every_steps=2"]
    # One process, in this process (the same code path; torchrun would only add start-up time).
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", *overrides]),
              out_dir=tmp_path / "one")
    common = ["train-dit", "-p", "tiny", "--cache", str(cache), *overrides]
    # global batch 8 = 2 processes × 2 micro-batches × 2 samples: DDP + no_sync accumulation on top.
    double = torchrun(2, *common, "--out", str(tmp_path / "two"), "grad_accum_steps=2")
    assert double.returncode == 0, double.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "one/checkpoints/step-000000003" / name))
        b = load_file(str(tmp_path / "two/checkpoints/step-000000003" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    la = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    # Only rank 0 writes: one metrics line per step, checkpoints at 2 and the final step 3.
    assert len(lb) == 3
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").glob("step-*")) == ["step-000000002",
                                                                                    "step-000000003"]


def test_time_based_saves_and_the_nan_guard_agree_across_ranks(tmp_path, monkeypatch):
    # Rank 0's clock decides every save (1e-6 minutes ≈ every step) and both ranks save together; at step 3 only
    # rank 1's weights go non-finite: the check before the save is all-reduced, so both ranks stop there with a
    # clear error instead of one of them waiting alone at the checkpoint barrier.
    cache = synthetic_cache(tmp_path / "cache")
    monkeypatch.setenv("RAE_FAULT_INJECT", "nan:weights@3")
    monkeypatch.setenv("RAE_FAULT_INJECT_RANK", "1")
    res = torchrun(2, "train-dit", "-p", "tiny", "--cache", str(cache), "--out", str(tmp_path / "run"),
                   "max_steps=4", "ckpt_every_steps=100", "ckpt_every_minutes=1e-6", "keep_last=5")
    assert res.returncode != 0
    assert "step 3: the weights about to be saved are not finite" in res.stdout + res.stderr
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step-*")) == ["step-000000001",
                                                                                    "step-000000002"]
