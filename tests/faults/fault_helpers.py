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


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a .pt holding it creates ``path`` if anything ever unpickles it
    with code execution allowed (``torch.load(weights_only=False)``)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_pt(path: Path, marker: Path) -> Path:
    """A real ``torch.save`` file whose state dict hides an object that would create ``marker`` when loaded."""
    torch.save({"weight": torch.zeros(2), "payload": _CreatesFile(marker)}, path)
    assert not marker.exists()
    return path


def rehash(checkpoint: Path, name: str) -> None:
    """Record ``name``'s current content in the checkpoint's meta.json (as if it had been saved like that), so the
    loader gets past the integrity check and must refuse the file on its own."""
    from rae_cli.checkpoint import sha256_file

    meta_path = Path(checkpoint) / "meta.json"
    meta = json.loads(meta_path.read_text())
    f = Path(checkpoint) / name
    meta["files"][name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    meta_path.write_text(json.dumps(meta))


def write_bad_image(path: Path, kind: str) -> Path:
    """A file with an image extension that cannot be used: truncated, zero-byte, decompression bomb (a PNG header
    claiming 60000×60000), not an image, or unreadable (an I/O error on read; as root chmod would not stop reads,
    so it is a link to /proc/self/mem, whose first page cannot be read)."""
    import io
    import os
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "bomb":
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    elif kind == "not-an-image":
        path.write_text("this is a text file with a .png name\n" * 20)
    elif kind == "unreadable":
        if os.geteuid() == 0:
            path.symlink_to("/proc/self/mem")
        else:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
            path.chmod(0)
    else:
        raise ValueError(kind)
    return path


BAD_KINDS = ("truncated", "zero-byte", "bomb", "not-an-image", "unreadable")
