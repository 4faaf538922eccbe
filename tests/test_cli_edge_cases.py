"""Edge cases a new user hits, each a one-line error with exit code 2 (never a traceback, never work thrown away):
unwritable output locations, decompression bombs, damaged cache shards, bad ``rae dataset`` options, a random-bytes
``.pt``, an unknown preset kind, a bad override value, and a sample folder whose run gained a checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rae_cli.cli.app import app
from rae_cli.errors import DataError

import rae_cli.cli  # noqa: F401  (registers every command on the app)


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------- --out


def test_out_that_is_a_file_fails_before_any_compute(tmp_path, monkeypatch):
    import rae_cli.encode as encode

    def no_compute(*a, **k):
        raise AssertionError("encoding started before the output location was checked")

    monkeypatch.setattr(encode, "encode_images", no_compute)
    monkeypatch.setattr(encode, "reconstruct_images", no_compute)
    img = _image(tmp_path / "in" / "a.png")
    target = tmp_path / "taken"
    target.write_text("not a folder")
    for cmd in ("encode", "recon"):
        result, text = _invoke(cmd, img, "--out", target, "-p", "tiny")
        assert result.exit_code == 2, result.output
        assert f"--out {target} is an existing file" in text
    result, text = _invoke("encode", img, "--out", target / "sub", "-p", "tiny")
    assert result.exit_code == 2 and f"{target} is a file" in text


@pytest.mark.parametrize("argv", [
    ["train-dit", "-p", "tiny", "--cache", "CACHE", "--out", "OUT"],
    ["train-decoder", "IMAGES", "--out", "OUT", "-p", "tiny"],
    ["cache-latents", "IMAGES", "--out", "OUT", "-p", "tiny"],
    ["sample", "-p", "tiny", "--out", "OUT", "dit_random_init=true"],
    ["convert-dit", "--out", "OUT", "checkpoint=x.pt", "dit=tiny"],
    ["overfit-probe", "--out", "OUT"],
    ["dataset", "digits", "--out", "OUT"],
    ["eval-digits", "IMAGES", "--real", "IMAGES", "--out", "OUT"],
    ["eval-fid", "IMAGES", "IMAGES", "--out", "OUT"],
], ids=lambda a: a[0])
def test_every_writing_command_checks_its_output_first(argv, tmp_path):
    taken = tmp_path / "file"
    taken.write_text("x")
    out = taken / "sub"  # under a file: can never be created
    args = [str(out) if a == "OUT" else str(tmp_path) if a in ("CACHE", "IMAGES") else a for a in argv]
    result, text = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"{taken} is a file" in text and "Traceback" not in result.output


def _can_drop_root_permissions() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def _run_cli(args):
    """The real CLI in a subprocess. As root, with CAP_DAC_OVERRIDE dropped (``setpriv``), so that permission bits
    apply as they would to any user (root ignores them otherwise)."""
    cmd = [sys.executable, "-m", "rae_cli", *map(str, args)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not _can_drop_root_permissions(), reason="running as root without setpriv")
def test_out_in_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = _run_cli(["dataset", "digits", "--out", locked / "digits"])
    finally:
        locked.chmod(0o755)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write in {locked} (Permission denied)" in text and "Traceback" not in proc.stderr
    assert not (locked / "digits").exists()


def test_out_on_a_read_only_filesystem(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (needs root and CAP_SYS_ADMIN)")
    try:
        result, text = _invoke("dataset", "digits", "--out", ro / "digits")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert result.exit_code == 2, result.output
    assert f"cannot write in {ro} (Read-only file system)" in text


def test_a_disk_error_mid_run_is_one_line():
    import typer

    from rae_cli.cli.common import handle_errors

    @handle_errors
    def writes():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/shard-00003.safetensors")

    with pytest.raises(typer.Exit) as e:
        writes()
    assert e.value.exit_code == 2

    @handle_errors
    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):  # not a location problem: the traceback stays
        bug()


# ---------------------------------------------------------------------------------------------------- data


def test_decompression_bomb_is_a_data_error(tmp_path):
    from faults.fault_helpers import write_bad_image

    from rae_cli.data import open_rgb

    bomb = write_bad_image(tmp_path / "bomb.png", "bomb")
    with pytest.raises(DataError, match="bomb.png"):
        open_rgb(bomb)
    result, text = _invoke("encode", bomb, "--out", tmp_path / "out", "-p", "tiny")
    assert result.exit_code == 2 and "bomb.png" in text and "exceeds limit" in text


def test_a_truncated_shard_is_named(tmp_path):
    from dit_training_helpers import synthetic_cache

    from rae_cli.latent_cache import LatentCache

    cache = synthetic_cache(tmp_path / "cache")
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    opened = LatentCache(cache)  # shards are opened (and checked) on first read, so many ranks can share a cache
    with pytest.raises(DataError, match="shard-00001.safetensors is damaged"):
        opened.read(list(range(len(opened))))


@pytest.mark.parametrize("option,value,needle", [("--size", "0", "--size 0"),
                                                 ("--test-fraction", "1.5", "--test-fraction 1.5")])
def test_dataset_rejects_bad_options(tmp_path, option, value, needle):
    result, text = _invoke("dataset", "digits", "--out", tmp_path / "d", option, value)
    assert result.exit_code == 2, result.output
    assert needle in text and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------- config


def test_random_bytes_pt_is_not_a_pytorch_checkpoint(tmp_path):
    bad = tmp_path / "stats.pt"
    bad.write_bytes(os.urandom(2048))
    img = _image(tmp_path / "a.png")
    result, text = _invoke("encode", img, "--out", tmp_path / "o", "-p", "tiny", f"rae.stats={bad}")
    assert result.exit_code == 2, result.output
    assert f"{bad} is not a PyTorch checkpoint" in text and "weights_only" not in text


def test_presets_of_an_unknown_kind_is_an_error():
    result, text = _invoke("presets", "nosuchkind")
    assert result.exit_code == 2 and "no preset kind 'nosuchkind'" in text and "train-dit" in text


def test_a_bad_override_value_names_its_key():
    from rae_cli.config import ConfigError, resolve
    from rae_cli.train_dit import TrainDiTConfig

    with pytest.raises(ConfigError, match="for epochs: Value 'abc'"):
        resolve(TrainDiTConfig, preset="tiny", overrides=["epochs=abc"])


# ---------------------------------------------------------------------------------------------------- sample


def test_sample_refuses_to_finish_with_a_changed_checkpoint(tmp_path):
    """The folder's images came from a checkpoint that has since changed (or gone): no mixing, a clear error."""
    from rae_cli.config import ConfigError, resolve, save_resolved
    from rae_cli.sample import SampleConfig, pin_sources, source_identity

    import torch

    weights = tmp_path / "stage2.pt"
    torch.save({"w": torch.zeros(3)}, weights)
    cfg = resolve(SampleConfig, preset="tiny", overrides=[f"checkpoint={weights}", "dit=tiny"])
    out = tmp_path / "samples"
    pinned, record = pin_sources(cfg, out)
    assert record["checkpoint"] == source_identity(str(weights)) and pinned.checkpoint == str(weights)
    save_resolved(cfg, out / "config.yaml", extra={"resolved_sources": record})
    assert pin_sources(cfg, out)[1] == record  # unchanged: resumes
    torch.save({"w": torch.ones(3)}, weights)  # overwritten by another model
    with pytest.raises(ConfigError, match="has changed since"):
        pin_sources(cfg, out)
    weights.unlink()
    with pytest.raises(ConfigError, match="is no longer there"):
        pin_sources(cfg, out)


def test_dry_run_needs_no_out_and_a_real_run_does(tmp_path, monkeypatch):
    # The command line: the plan of the 8-GPU preset, without --out (nothing is written)
    monkeypatch.chdir(tmp_path)
    res, text = _invoke("train-dit", "-p", "dit-dh-xl_dinov2-b_in256", "--dry-run")
    assert res.exit_code == 0, text
    assert "memory plan per process" in text and "planned for ONE process" in text
    monkeypatch.setenv("WORLD_SIZE", "8")
    res, text = _invoke("train-dit", "-p", "dit-dh-xl_dinov2-b_in256", "--dry-run")
    assert res.exit_code == 0 and "8 process(es)" in text and "planned for ONE process" not in text
    for args in (["train-dit", "-p", "tiny"], ["sample", "-p", "tiny"], ["cache-latents", str(tmp_path), "-p", "tiny"],
                 ["train-decoder", str(tmp_path), "-p", "tiny"]):
        res, text = _invoke(*args)
        assert res.exit_code == 2 and "missing option --out" in text, (args, text)
    assert list(tmp_path.iterdir()) == []
