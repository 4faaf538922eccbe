"""``rae sample`` under torchrun (2 CPU processes, gloo): the same images as one process, split by index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from test_sample import invoke, load_npz, tiny_run  # noqa: F401  (tiny_run is a fixture)
from test_sample import official  # noqa: F401


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_two_processes_make_the_same_images_as_one(tmp_path, tiny_run):  # noqa: F811
    common = ["-p", "tiny", f"checkpoint={tiny_run}", "num_images=5", "num_steps=3", "label_sampling=random",
              "guidance.method=cfg", "guidance.scale=2.0"]
    torch.set_num_threads(1)
    invoke("sample", "--out", tmp_path / "one", *common, "batch_size=3")

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = _torchrun() + ["--standalone", "--nproc_per_node", "2", "-m", "rae_cli", "sample", "--out",
                         str(tmp_path / "two"), *common, "batch_size=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    np.testing.assert_array_equal(load_npz(tmp_path / "two" / "samples.npz"),
                                  load_npz(tmp_path / "one" / "samples.npz"))
    info = json.loads((tmp_path / "two" / "sample_info.json").read_text())
    assert info["world_size"] == 2 and info["generated_this_run"] == 5
    assert info["labels"] == json.loads((tmp_path / "one" / "sample_info.json").read_text())["labels"]
    assert info["network_evaluations_per_image"]["main"] == 2 + 2  # 2 steps, each with its unconditional row
