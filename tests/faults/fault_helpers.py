"""Helpers of the fault suite: copying runs, checking checkpoints, comparing weights bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

KILLED = -9  # subprocess return code of a process that died of SIGKILL


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def steps(run: Path) -> list[int]:
    """Steps of the complete checkpoint folders of a run (no verification)."""
    from rae_cli.run_dir import list_checkpoints

    return [c.step for c in list_checkpoints(Path(run) / "checkpoints")]


def lost_checkpoints(run: Path, expected: list[int]) -> int:
    """How many of the checkpoints ``expected`` are missing or fail verification (files lost by a fault)."""
    from rae_cli.checkpoint import CheckpointError
    from rae_cli.run_dir import Checkpoint, checkpoint_name, verify_checkpoint

    lost = 0
    for step in expected:
        path = Path(run) / "checkpoints" / checkpoint_name(step)
        try:
            verify_checkpoint(Checkpoint(path, step))
        except CheckpointError:
            lost += 1
    return lost


def assert_same_weights(a: Path, b: Path, names: tuple[str, ...]) -> None:
    """The safetensors ``names`` of checkpoint folders ``a`` and ``b`` hold bit-identical tensors."""
    from rae_cli.checkpoint import load_safetensors

    for name in names:
        ta, _ = load_safetensors(Path(a) / f"{name}.safetensors")
        tb, _ = load_safetensors(Path(b) / f"{name}.safetensors")
        assert ta.keys() == tb.keys(), name
        bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not bad, f"{name} differs from the uninterrupted run in {bad[:5]}"


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def explain(proc) -> str:
    return f"rc {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"


def error_line(proc) -> str:
    """The CLI's one-line error (rich may wrap it at the terminal width: joined back into one line)."""
    text = " ".join(proc.stderr.split())
    assert "error:" in text, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    return text[text.index("error:"):]
