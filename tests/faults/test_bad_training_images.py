"""Bad files in a training folder (issue 10, item 4): train-decoder and on-the-fly train-dit count, log and replace
them, and the run goes on; the replacement is deterministic, so a resumed run is bit-identical; files added or
removed between launches do not block resume. Real CLI subprocesses on the tiny presets."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

GOOD = 7
BAD_KINDS = ("unreadable", "truncated", "zero-byte", "decompression-bomb", "non-image")


def _png_bytes(seed: int, size: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 4 * (seed % 3), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb() -> bytes:
    """A valid, tiny PNG whose header claims 60000×60000 RGB pixels (3.6 G pixels: over PIL's limit)."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def bad_folder(root: Path) -> dict[str, Path]:
    """GOOD readable PNGs plus one file of each bad kind, flat (unconditional), all with image extensions."""
    root.mkdir(parents=True)
    for i in range(GOOD):
        (root / f"good{i}.png").write_bytes(_png_bytes(i))
    bad = {"unreadable": root / "unreadable.png", "truncated": root / "truncated.png",
           "zero-byte": root / "zero.jpg", "decompression-bomb": root / "bomb.png", "non-image": root / "notes.jpg"}
    bad["unreadable"].write_bytes(np.random.default_rng(9).bytes(3000))
    bad["truncated"].write_bytes(_png_bytes(20)[:300])
    bad["zero-byte"].write_bytes(b"")
    bad["decompression-bomb"].write_bytes(_bomb())
    bad["non-image"].write_text("these are my notes, not a JPEG\n" * 20)
    (root / "README.txt").write_text("not an image extension: never listed\n")
    return bad


def _skipped(out: Path) -> set[str]:
    return {json.loads(line)["file"] for line in (out / "skipped_images.jsonl").read_text().splitlines()}


def _last_metrics(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]


def _record(fault_report, trainer: str, bad: dict[str, Path], out: Path, ok: bool) -> None:
    logged = _skipped(out) if (out / "skipped_images.jsonl").is_file() else set()
    for kind in BAD_KINDS:
        row = fault_report.injected(f"{trainer}: {kind} image in the training folder")
        row.survived = ok and str(bad[kind]) in logged
        row.files_lost = 0 if row.survived else 1


DECODER = ["-p", "tiny", "loss.perceptual_weight=0", "data.holdout=0", "train.epochs=1", "train.ckpt_every=1"]


def test_train_decoder_skips_bad_images_and_resumes_identically(tmp_path, rae_cli_run, fault_report):
    images = tmp_path / "images"
    bad = bad_folder(images)  # 12 files, global batch 4: one epoch = 3 steps visits every file
    full = rae_cli_run(["train-decoder", images, "--out", tmp_path / "a", *DECODER])
    assert full.returncode == 0, full.stdout + full.stderr
    ok = _skipped(tmp_path / "a") == {str(p) for p in bad.values()}
    _record(fault_report, "train-decoder", bad, tmp_path / "a", ok)
    assert ok, _skipped(tmp_path / "a")
    assert _last_metrics(tmp_path / "a")["skipped_images"] == len(BAD_KINDS)
    assert "skipped an unreadable training image" in full.stderr

    # Stopped after step 1 and resumed: the same replacements, bit for bit.
    half = rae_cli_run(["train-decoder", images, "--out", tmp_path / "b", *DECODER, "train.stop_after=1"])
    assert half.returncode == 0, half.stderr
    rest = rae_cli_run(["train-decoder", images, "--out", tmp_path / "b", *DECODER])
    assert rest.returncode == 0, rest.stderr
    ck = "checkpoints/step-000000003"
    for name in ("decoder", "ema", "disc"):
        a, b = load_file(str(tmp_path / "a" / ck / f"{name}.safetensors")), \
            load_file(str(tmp_path / "b" / ck / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _skipped(tmp_path / "b") == _skipped(tmp_path / "a")  # no duplicates after the resume


def test_train_decoder_resumes_on_a_changed_file_list(tmp_path, rae_cli_run, fault_report):
    images = tmp_path / "images"
    bad = bad_folder(images)
    out = tmp_path / "run"
    first = rae_cli_run(["train-decoder", images, "--out", out, *DECODER, "train.stop_after=1"])
    assert first.returncode == 0, first.stderr
    row = fault_report.injected("train-decoder: files removed and added between launches")
    bad["zero-byte"].unlink()
    (images / "added.png").write_bytes(_png_bytes(33))
    (images / "added2.png").write_bytes(_png_bytes(34))  # 13 files now: 3 steps/epoch
    again = rae_cli_run(["train-decoder", images, "--out", out, *DECODER])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming on the new file list" in again.stderr
    assert (out / "checkpoints" / "step-000000003").is_dir() and (out / "export" / "rae.yaml").is_file()
    row.survived = True


def test_train_dit_on_the_fly_skips_bad_images(tmp_path, rae_cli_run, fault_report):
    images = tmp_path / "images"
    bad = bad_folder(images)
    args = ["train-dit", "-p", "tiny", "--data", images, "stats=none", "global_batch_size=4", "epochs=1",
            "ckpt_every_steps=1"]
    full = rae_cli_run([*args, "--out", tmp_path / "a"])
    assert full.returncode == 0, full.stdout + full.stderr
    ok = _skipped(tmp_path / "a") == {str(p) for p in bad.values()}
    _record(fault_report, "train-dit (on the fly)", bad, tmp_path / "a", ok)
    assert ok, _skipped(tmp_path / "a")
    assert _last_metrics(tmp_path / "a")["skipped_images"] == len(BAD_KINDS)
    half = rae_cli_run([*args, "--out", tmp_path / "b", "max_steps=1"])
    assert half.returncode == 0, half.stderr
    rest = rae_cli_run([*args, "--out", tmp_path / "b"])
    assert rest.returncode == 0, rest.stderr
    a = load_file(str(tmp_path / "a/checkpoints/step-000000003/ema.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-000000003/ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["decompression-bomb", "truncated", "zero-byte"])
def test_open_rgb_maps_each_bad_kind_to_a_data_error(tmp_path, kind):
    from rae_cli.data import open_rgb
    from rae_cli.errors import DataError

    bad = bad_folder(tmp_path / "f")
    with pytest.raises(DataError, match="cannot read image"):
        open_rgb(bad[kind])
