"""MeanFlow under torchrun: 2 gloo processes (JVP without grad on the bare module + a DDP forward) match 1 process
(one-pass JVP) with the same global batch (CPU)."""

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


def test_meanflow_two_processes_match_one_process(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    overrides = ["max_steps=2", "ckpt_every_steps=2", "meanflow.ratio_r_neq_t=0.75"]
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny-meanflow", overrides=[f"cache={cache}", *overrides]),
              out_dir=tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rae_cli",
           "train-dit", "-p", "tiny-meanflow", "--cache", str(cache), *overrides, "--out", str(tmp_path / "two"),
           "grad_accum_steps=2"]
    double = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "one/checkpoints/step-000000002" / name))
        b = load_file(str(tmp_path / "two/checkpoints/step-000000002" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")
    la = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)
