"""Durable checkpoints: modes from the umask, content hashes, verified resume with fallback, torn metrics lines,
and the one-line errors of ``torch_load_weights``."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch

from rae_cli.checkpoint import CheckpointError, atomic_write_text, torch_load_weights
from rae_cli.run_dir import (META_FILE, MetricsLogger, latest_checkpoint, list_checkpoints, resolve_checkpoint,
                             save_checkpoint, verify_checkpoint)


def _save(root, step):
    w = {"model": {"w": torch.full((4, 4), float(step))}, "ema": {"w": torch.full((4, 4), -float(step))}}
    return save_checkpoint(root, step, weights=w, resume_state={"step": step, "x": torch.arange(3)})


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "hi")
        ck = _save(tmp_path / "ck", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    for f in ck.path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "b.txt", "hi")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644


def test_meta_records_a_hash_of_every_file(tmp_path):
    import hashlib

    ck = _save(tmp_path, 5)
    files = json.loads((ck.path / META_FILE).read_text())["files"]
    assert sorted(files) == ["ema.safetensors", "model.safetensors", "resume.pt"]
    for name, info in files.items():
        data = (ck.path / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    verify_checkpoint(ck)


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "no-meta", "no-resume"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    ck = _save(root, 4)
    f = ck.path / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "zero":
        f.write_bytes(b"")
    elif damage == "flip":  # same size, one byte changed: only the hash sees it
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "no-meta":
        (ck.path / META_FILE).unlink()
    else:
        (ck.path / "resume.pt").unlink()
    with caplog.at_level(logging.WARNING):
        got = latest_checkpoint(root)
    assert got is not None and got.step == 2
    assert "step-000000004" in caplog.text and "step-000000002" in caplog.text
    assert not ck.path.exists() and (root / ".damaged-step-000000004").is_dir()  # kept, out of the way
    assert [c.step for c in list_checkpoints(root)] == [2]
    assert resolve_checkpoint(tmp_path).step == 2  # the run folder resolves the same way


def test_only_damaged_checkpoints_means_none_and_explicit_damaged_folder_is_an_error(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    ck = _save(root, 3)
    (ck.path / "ema.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        resolve_checkpoint(ck.path)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(root) is None
    assert "no valid checkpoint" in caplog.text


def test_checkpoints_without_hashes_still_load_and_are_checked_structurally(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    ck = _save(root, 2)
    for c in (root / "step-000000001", ck.path):  # as written before content hashes existed
        meta = json.loads((c / META_FILE).read_text())
        del meta["files"]
        (c / META_FILE).write_text(json.dumps(meta))
    assert latest_checkpoint(root).step == 2
    assert torch.equal(resolve_checkpoint(ck.path).weights("model")["w"], torch.full((4, 4), 2.0))
    data = (ck.path / "model.safetensors").read_bytes()
    (ck.path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(root).step == 1


def test_metrics_logger_tolerates_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\nnot json\n{"step": 3, "loss": 0.8}\n'
                    '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        m = MetricsLogger(tmp_path, start_step=3, enabled=True)
    m.log(4, {"loss": 0.7})
    m.close()
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.7
    assert "2 unreadable line" in caplog.text


def test_torch_load_weights_says_what_a_bad_file_is(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as e:
        torch_load_weights(tmp_path / "random.pt")
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged") as e:
        torch_load_weights(tmp_path / "cut.pt")
    assert "\n" not in str(e.value)
    assert torch.equal(torch_load_weights(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_png_completeness_check_catches_a_cut_short_image(tmp_path):
    import numpy as np

    from rae_cli.npz import png_complete, save_image_folder

    path = save_image_folder(np.full((1, 8, 8, 3), 7, np.uint8), tmp_path, durable=False)[0]
    assert png_complete(path)
    data = path.read_bytes()
    for broken in (data[:-1], data[: len(data) // 2], b""):
        path.write_bytes(broken)
        assert not png_complete(path)
