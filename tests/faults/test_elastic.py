"""Elastic restarts: under ``torchrun --max-restarts``, a worker killed with SIGKILL makes torchrun restart the whole
job, and each command resumes from its last checkpoint by itself — the result equals an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from dit_training_helpers import synthetic_cache  # noqa: E402


def torchrun(nproc: int, *args: str, restarts: int = 0, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAE_FAULT")}
    # A fresh rendezvous store per attempt (examples/multinode/env.sh): with torchrun's shared store a restarted
    # worker may read the killed attempt's gloo addresses and fail to connect (pytorch#135712).
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "rae_cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def kill_rank1(point: str) -> dict:
    return {"RAE_FAULT_INJECT": f"kill:{point}", "RAE_FAULT_INJECT_RANK": "1"}


def test_train_dit_survives_a_killed_worker_bit_for_bit(tmp_path, fault_report):
    cache = synthetic_cache(tmp_path / "cache")
    common = ["train-dit", "-p", "tiny", "--cache", str(cache), "max_steps=5", "ckpt_every_steps=2"]
    ref = torchrun(2, *common, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    row = fault_report.injected("SIGKILL rank 1 of 2 at train-dit step 3 (torchrun --max-restarts=2)")
    run = torchrun(2, *common, "--out", str(tmp_path / "run"), restarts=2, env_extra=kill_rank1("train-step@3"))
    assert run.returncode == 0, run.stderr[-3000:]
    # The kill did happen and the restart resumed from the step-2 checkpoint (not from scratch).
    assert "Signals.SIGKILL" in run.stderr or "exitcode: -9" in run.stderr, run.stderr[-3000:]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps 3.. were redone after the restart, and logged once
    final = "checkpoints/step-000000005"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / final / name)), load_file(str(tmp_path / "run" / final / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit
    ra = torch.load(tmp_path / "ref" / final / "resume.pt", weights_only=True)["optimizer"]["state"]
    rb = torch.load(tmp_path / "run" / final / "resume.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(ra[i][k], rb[i][k]) for i in ra for k in ra[i])
    leftovers = [p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    row.survived = True


def test_sample_survives_a_killed_worker_without_duplicate_or_missing_image(tmp_path, fault_report):
    from rae_cli.config import resolve
    from rae_cli.sample import SampleConfig, sample

    n = 7
    common = ["-p", "tiny", "dit_random_init=true", f"num_images={n}", "num_steps=3", "batch_size=1",
              "label_sampling=random", "grid_images=0"]
    # The uninterrupted reference on one process: image i depends on (seed, i) only, not on the process count.
    sample(resolve(SampleConfig, preset="tiny", overrides=common[2:]), tmp_path / "ref")

    row = fault_report.injected("SIGKILL rank 1 of 2 after rae sample wrote image 3 (torchrun --max-restarts=2)")
    out = tmp_path / "run"
    run = torchrun(2, "sample", "--out", str(out), *common, restarts=2, env_extra=kill_rank1("sample-image@3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Signals.SIGKILL" in run.stderr or "exitcode: -9" in run.stderr, run.stderr[-3000:]
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(n)]  # none missing, none twice
    row.files_lost = n - len(pngs)
    with np.load(out / "samples.npz") as got, np.load(tmp_path / "ref" / "samples.npz") as want:
        np.testing.assert_array_equal(got["arr_0"], want["arr_0"])
    row.survived = True


def test_cache_latents_survives_a_killed_worker(tmp_path, fault_report):
    import json

    from dit_training_helpers import image_folder
    from rae_cli.config import resolve
    from rae_cli.latent_cache import CacheLatentsConfig, cache_latents

    images = image_folder(tmp_path / "images", per_class=3, classes=2)  # 6 images, 1 per shard
    cache_latents(resolve(CacheLatentsConfig, preset="tiny", overrides=["shard_size=1"]), images,
                  tmp_path / "ref")

    row = fault_report.injected("SIGKILL rank 1 of 2 after cache-latents wrote shard 3 (torchrun --max-restarts=2)")
    out = tmp_path / "run"
    run = torchrun(2, "cache-latents", str(images), "--out", str(out), "-p", "tiny", "shard_size=1",
                   restarts=2, env_extra=kill_rank1("cache-shard@3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Signals.SIGKILL" in run.stderr or "exitcode: -9" in run.stderr, run.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("shard-"))
    assert names == [f"shard-{s:05d}.safetensors" for s in range(6)]  # each shard once, no temporary left
    row.files_lost = 6 - len(names)
    for name in names:
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=f"{name}:{k}")
    sa, sb = load_file(str(tmp_path / "ref/stats.safetensors")), load_file(str(out / "stats.safetensors"))
    for k in ("mean", "var"):  # float64 sums over 2 processes vs 1: equal up to rounding
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-6)
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (tmp_path / "ref", out))
    assert ia["shards"] == ib["shards"] and ib["num_images"] == 6
    row.survived = True


def test_train_decoder_survives_a_killed_worker_bit_for_bit(tmp_path, fault_report):
    from test_train_decoder_ddp import _write_images

    images = tmp_path / "images"
    _write_images(images)  # 10 images; 2 held out
    # TEST DOUBLES: random-init encoder and discriminator backbone (tiny preset), no LPIPS.
    common = ["train-decoder", str(images), "-p", "tiny", "loss.perceptual_weight=0", "train.micro_batch_size=1",
              "train.epochs=3", "train.ckpt_every=2"]  # 6 steps of 4 images = 2 processes × 1 × 2 accumulation
    ref = torchrun(2, *common, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    row = fault_report.injected("SIGKILL rank 1 of 2 at train-decoder step 3 (torchrun --max-restarts=2)")
    run = torchrun(2, *common, "--out", str(tmp_path / "run"), restarts=2, env_extra=kill_rank1("train-step@3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Signals.SIGKILL" in run.stderr or "exitcode: -9" in run.stderr, run.stderr[-3000:]
    assert "resuming from" in run.stderr and "step-000000002" in run.stderr
    final = "checkpoints/step-000000006"
    for name in ("decoder", "ema", "disc"):
        a = load_file(str(tmp_path / "ref" / final / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "run" / final / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit
    row.survived = True
