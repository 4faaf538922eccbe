"""weights.py: resolving local copies, the offline download path, and the artifact registry."""

from __future__ import annotations

import time

import pytest

from rae_cli import weights
from rae_cli.weights import ARTIFACTS, WeightsNotFoundError, download, resolve


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "rae"


def test_resolve_released_file_under_rae_home(home):
    path = home / "RAE-collections" / "decoders/dinov2/wReg_base/ViTXL_n08/model.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert resolve("decoder-dinov2-b") == path
    assert download("decoder-dinov2-b") == path  # present: no network needed even offline


def test_resolve_missing_names_command_and_location(home):
    with pytest.raises(WeightsNotFoundError) as err:
        resolve("stats-dinov2-b")
    msg = str(err.value)
    assert "rae download stats-dinov2-b" in msg
    assert str(home / "RAE-collections" / "stats/dinov2/wReg_base/imagenet1k/stat.pt") in msg
    assert "nyu-visionx/RAE-collections" in msg


def test_download_offline_fails_at_once(home):
    start = time.monotonic()
    for name in ("ditdh-xl-256", "fid-inception", "dinov2-b"):
        if name == "dinov2-b" and weights._hf_cached_snapshot(ARTIFACTS[name].source) is not None:
            continue  # cached on this machine: nothing to test offline
        with pytest.raises(WeightsNotFoundError, match="offline"):
            download(name)
    assert time.monotonic() - start < 5


def test_torch_hub_and_discriminator_locations(home, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="rae download fid-inception"):
        resolve("fid-inception")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert resolve("fid-inception") == ckpt

    disc = home / "discs" / "dino_vit_small_patch8_224.pth"  # the official file name also works
    disc.parent.mkdir(parents=True)
    disc.write_bytes(b"x")
    assert resolve("dino-vits8") == disc


def test_encoder_local_copy(home):
    folder = home / "encoders" / "mae-b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve("mae-b") == folder


def test_weights_shipped_in_packages():
    assert resolve("lpips-vgg-lin").name == "vgg.pth"
    assert resolve("efficientnet-lite0").stat().st_size > 1_000_000


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="decoder-dinov2-b"):
        resolve("decoder-unknown")
