"""Faults during ``rae cache-latents`` and ``rae sample`` (real CLI subprocesses, tiny presets, CPU): kills, a
damaged shard in a partial cache, and a run that gains a checkpoint between two ``rae sample`` invocations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dit_training_helpers import image_folder, synthetic_cache
from faults.fault_helpers import KILLED, copy_run, explain
from rae_cli.latent_cache import _shard_intact
from rae_cli.npz import png_complete

CACHE_ARGS = ["-p", "tiny", "shard_size=4"]  # 10 images → shards of 4, 4, 2


def _shards(cache):
    return sorted(p.name for p in cache.glob("shard-*.safetensors"))


def _assert_same_cache(a, b):
    from rae_cli.checkpoint import load_safetensors

    assert _shards(a) == _shards(b)
    for name in _shards(a) + ["stats.safetensors"]:
        ta, _ = load_safetensors(a / name)
        tb, _ = load_safetensors(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    ia, ib = (json.loads((c / "index.json").read_text()) for c in (a, b))
    assert ia["shards"] == ib["shards"] and ia["num_images"] == ib["num_images"] == 10


@pytest.fixture(scope="module")
def cache(tmp_path_factory, rae_cli_run):
    """Images, an uninterrupted cache, and a cache whose run was killed -9 right after shard 1 was written."""
    root = tmp_path_factory.mktemp("cache_faults")
    images = image_folder(root / "images", per_class=5, classes=2)
    ref = root / "reference"
    proc = rae_cli_run(["cache-latents", images, "--out", ref, *CACHE_ARGS])
    assert proc.returncode == 0, explain(proc)
    partial = root / "partial"
    killed = rae_cli_run(["cache-latents", images, "--out", partial, *CACHE_ARGS],
                         env_extra={"RAE_FAULT_INJECT": "kill:cache-shard@1"})
    return dict(images=images, ref=ref, partial=partial, killed=killed)


def test_cache_latents_killed_after_a_shard_resumes_without_duplicate_or_missing_shards(cache, tmp_path,
                                                                                       rae_cli_run, fault_report):
    row = fault_report.injected("cache-latents: kill -9 after shard 1")
    assert cache["killed"].returncode == KILLED, explain(cache["killed"])
    assert _shards(cache["partial"]) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    row.files_lost = sum(not _shard_intact(p) for p in cache["partial"].glob("shard-*.safetensors"))
    out = copy_run(cache["partial"], tmp_path / "cache")
    proc = rae_cli_run(["cache-latents", cache["images"], "--out", out, *CACHE_ARGS])
    assert proc.returncode == 0, explain(proc)
    assert "2 already done" in proc.stderr
    _assert_same_cache(out, cache["ref"])
    row.survived = True


def test_cache_latents_re_encodes_a_truncated_shard_of_a_partial_cache(cache, tmp_path, rae_cli_run, fault_report):
    row = fault_report.injected("cache-latents: truncated shard in a partial cache")
    out = copy_run(cache["partial"], tmp_path / "cache")
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = rae_cli_run(["cache-latents", cache["images"], "--out", out, *CACHE_ARGS])
    assert proc.returncode == 0, explain(proc)
    assert "damaged shard" in proc.stderr and "shard-00001.safetensors" in proc.stderr, explain(proc)
    _assert_same_cache(out, cache["ref"])
    row.survived = True


# ---------------------------------------------------------------------------------------------------------------
# sample: a tiny train-dit run with checkpoints at steps 4 and 8.


@pytest.fixture(scope="module")
def trained(tmp_path_factory, rae_cli_run):
    root = tmp_path_factory.mktemp("sample_faults")
    latents = synthetic_cache(root / "cache")
    run = root / "run"
    proc = rae_cli_run(["train-dit", "-p", "tiny", "--cache", latents, "--out", run, "epochs=2", "ckpt_every_steps=4"])
    assert proc.returncode == 0, explain(proc)
    step4 = run / "checkpoints" / "step-000000004"
    ref = root / "reference"  # 8 images of step 4, in one go
    proc = rae_cli_run(["sample", "-p", "tiny", "--out", ref, f"checkpoint={step4}", "batch_size=2"])
    assert proc.returncode == 0, explain(proc)
    return dict(root=root, run=run, step4=step4, ref=ref)


def _npz(folder):
    with np.load(folder / "samples.npz") as f:
        return f["arr_0"]


def _assert_same_samples(out, ref):
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(8)]  # none missing, none twice, no temporary leftovers
    assert np.array_equal(_npz(out), _npz(ref))


def test_sample_killed_after_an_image_resumes_without_duplicate_or_missing_images(trained, tmp_path, rae_cli_run,
                                                                                  fault_report):
    row = fault_report.injected("sample: kill -9 after image 4")
    out = tmp_path / "samples"
    args = ["sample", "-p", "tiny", "--out", out, f"checkpoint={trained['step4']}", "batch_size=2"]
    proc = rae_cli_run(args, env_extra={"RAE_FAULT_INJECT": "kill:sample-image@4"})
    assert proc.returncode == KILLED, explain(proc)
    assert len(list((out / "images").glob("*.png"))) == 5 and not (out / "samples.npz").exists()
    row.files_lost = sum(not png_complete(out / "images" / f"{i:06d}.png") for i in range(5))
    proc = rae_cli_run(args)
    assert proc.returncode == 0, explain(proc)
    _assert_same_samples(out, trained["ref"])
    row.survived = True


def test_sample_does_not_mix_models_when_the_run_gains_a_checkpoint_between_invocations(trained, tmp_path,
                                                                                        rae_cli_run, fault_report):
    row = fault_report.injected("sample: run gains a checkpoint between two invocations")
    run = copy_run(trained["run"], tmp_path / "run")
    newer = run / "checkpoints" / "step-000000008"
    held = shutil.move(newer, tmp_path / "held-back")  # the run as it was at step 4
    out = tmp_path / "samples"
    args = ["sample", "-p", "tiny", "--out", out, f"checkpoint={run}", "batch_size=2"]
    proc = rae_cli_run(args, env_extra={"RAE_FAULT_INJECT": "kill:sample-image@3"})
    assert proc.returncode == KILLED, explain(proc)
    shutil.move(held, newer)  # training went on: the run folder now resolves to step 8
    proc = rae_cli_run(args)
    assert proc.returncode == 0, explain(proc)
    log = " ".join(proc.stderr.split())
    assert "step-000000008" in log and "continuing with that one" in log, explain(proc)
    _assert_same_samples(out, trained["ref"])  # every image from step 4, like the reference
    info = json.loads((out / "sample_info.json").read_text())
    assert "step-000000004" in info["source"]
    row.survived = True
