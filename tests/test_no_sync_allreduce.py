"""Gradient accumulation under DDP all-reduces once per optimizer step, not once per micro-batch (``no_sync``).

Both trainers run under torchrun (2 gloo processes on CPU) through a launcher that wraps
``rae_cli.training.session.wrap_ddp`` (both trainers look it up there when they start) so that every DDP model gets a
comm hook that counts its bucket all-reduces, then calls the default all-reduce. The losses cannot show a missing
``no_sync`` (the averaged gradients are the same, only the traffic is k times larger), the count does. The second
launch of each test breaks ``no_sync`` (a null context) and must count k times more: the test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dit_training_helpers import image_folder, synthetic_cache

REPO = Path(__file__).resolve().parents[1]
ACCUM, STEPS = 2, 2  # micro-batches per optimizer step per process, optimizer steps

LAUNCHER = textwrap.dedent('''
    """python LAUNCHER COUNTS_FILE BREAK_NO_SYNC RAE_ARGS... under torchrun: `rae` with counted all-reduces."""
    import contextlib, json, os, sys

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import rae_cli.training.session as session

    counts_file, broken = sys.argv[1], sys.argv[2] == "1"
    del sys.argv[1:3]
    counts, real_wrap_ddp = {}, session.wrap_ddp

    def counting_wrap_ddp(module, device, *, sync_buffers):
        ddp = real_wrap_ddp(module, device, sync_buffers=sync_buffers)
        buckets = counts.setdefault(type(module).__name__, [])

        def hook(process_group, bucket):
            buckets.append(bucket.index())
            return allreduce_hook(process_group, bucket)

        ddp.register_comm_hook(None, hook)  # None: the default process group
        if broken:  # the defect to catch: every micro-batch's backward all-reduces
            ddp.no_sync = contextlib.nullcontext
        return ddp

    session.wrap_ddp = counting_wrap_ddp
    from rae_cli.cli import main

    try:
        main()
    finally:
        with open(f"{counts_file}.rank{os.environ['RANK']}.json", "w") as f:
            json.dump(counts, f)
        from torch._dynamo.utils import counters

        with open(f"{counts_file}.graphs.rank{os.environ['RANK']}.json", "w") as f:
            json.dump(counters["stats"]["unique_graphs"], f)
''')


def counted_run(tmp_path: Path, name: str, broken: bool, *rae_args: str) -> dict[str, list[int]]:
    """Run ``rae *rae_args`` on 2 processes; {DDP-wrapped module class: bucket index of every all-reduce}."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    counts = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           str(counts), "1" if broken else "0", *rae_args, "--out", str(tmp_path / f"run-{name}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{counts}.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every all-reduce is a collective: both ranks took part in each
    return ranks[0]


def check_counts(intact: dict[str, list[int]], broken: dict[str, list[int]], models: set[str]) -> None:
    assert set(intact) == set(broken) == models
    for name in models:
        buckets = len(set(intact[name]))  # the all-reduces of ONE backward: one per bucket
        assert buckets >= 1
        assert len(intact[name]) == STEPS * buckets, (
            f"{name}: {len(intact[name])} all-reduces in {STEPS} optimizer steps of {ACCUM} micro-batches with "
            f"{buckets} bucket(s); no_sync should make it {STEPS * buckets}")
        assert len(broken[name]) == ACCUM * len(intact[name])  # what the check above would have caught


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic_cache(root / "cache")
    image_folder(root / "images", per_class=4)  # 8 images: 2 held out, 6 → 1 step per epoch at global batch 4
    return root


def test_train_dit_accumulation_all_reduces_once_per_step(data, tmp_path):
    # global batch 8 = 2 processes × ACCUM micro-batches × 2 latents
    args = ["train-dit", "-p", "tiny", "--cache", str(data / "cache"), f"max_steps={STEPS}",
            f"grad_accum_steps={ACCUM}"]
    intact = counted_run(tmp_path, "intact", False, *args)
    broken = counted_run(tmp_path, "broken", True, *args)
    check_counts(intact, broken, {"DiTDH"})


def test_train_decoder_accumulation_all_reduces_once_per_step(data, tmp_path):
    # global batch 4 = 2 processes × ACCUM micro-batches × 1 image; the GAN is on from step 0 (tiny preset), so
    # both the decoder (inside the RAE wrapper) and the discriminator heads are DDP models with their own steps.
    args = ["train-decoder", str(data / "images"), "-p", "tiny", "loss.perceptual_weight=0",
            "train.micro_batch_size=1", f"train.epochs={STEPS}"]
    intact = counted_run(tmp_path, "intact", False, *args)
    broken = counted_run(tmp_path, "broken", True, *args)
    check_counts(intact, broken, {"RAE", "DinoDiscriminator"})


def test_compiled_ddp_still_all_reduces_once_per_step_and_trains_like_eager(data, tmp_path):
    # compile=true under DDP: dynamo splits the graph at the bucket boundaries (DDPOptimizer) and the gradients
    # still travel through DDP's reducer — counted by the same hook, skipped by no_sync, the same losses as eager.
    args = ["train-dit", "-p", "tiny", "--cache", str(data / "cache"), f"max_steps={STEPS}",
            f"grad_accum_steps={ACCUM}"]
    eager = counted_run(tmp_path, "eager", False, *args)
    compiled = counted_run(tmp_path, "compiled", False, *args, "compile=true")
    assert compiled == eager  # the same all-reduces of the same buckets, once per optimizer step
    graphs = [json.loads((tmp_path / f"{name}.graphs.rank0.json").read_text()) for name in ("eager", "compiled")]
    assert graphs[0] == 0 and graphs[1] > 0  # compile=true really went through dynamo
    assert len(compiled["DiTDH"]) == STEPS * len(set(compiled["DiTDH"]))

    def losses(name: str) -> list[float]:
        lines = (tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    assert len(losses("compiled")) == STEPS
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4)
