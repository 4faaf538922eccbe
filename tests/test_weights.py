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


# ---------------------------------------------------------------------------------------------------
# Bundles: `rae download PRESET` fetches everything that preset needs


def _fake_present(name: str) -> None:
    """Put a stand-in file where ``resolve`` looks (the local-copy layout of $RAE_HOME / the torch hub folder)."""
    art = weights.get_artifact(name)
    path = weights.candidates(name)[0]
    if art.kind == "hf-model":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
    elif art.kind != "package":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_bundles_name_presets_and_real_artifacts():
    from rae_cli.config import list_presets

    presets = {p.split("/", 1)[1] for p in list_presets()}
    for name, bundle in weights.BUNDLES.items():
        assert name in presets or name == "eval-fid", f"bundle {name} is not named after a preset"
        assert bundle.artifacts and all(a in weights.ARTIFACTS for a in bundle.artifacts)
        assert weights.bundle_size_mb(name) > 0
    assert set(weights.BUNDLES["dit-dh-xl_in256"].artifacts) == set(weights.BUNDLES["dinov2-b"].artifacts) | {
        "ditdh-xl-256"}


def test_download_bundle_from_local_copies_offline(home):
    from typer.testing import CliRunner

    from rae_cli.cli import app

    for name in weights.BUNDLES["dit-dh-xl_in256"].artifacts:
        _fake_present(name)
    result = CliRunner().invoke(app, ["download", "dit-dh-xl_in256"])
    assert result.exit_code == 0, result.output
    for name in ("dinov2-b", "decoder-dinov2-b", "stats-dinov2-b", "ditdh-xl-256"):
        assert f"ok {name}: {weights.resolve(name)}" in result.output.replace("\n", "")


def test_download_bundle_names_every_missing_artifact(home):
    from typer.testing import CliRunner

    from rae_cli.cli import app

    _fake_present("dinov2-b")  # the encoder is here, the decoder and stats are not
    result = CliRunner().invoke(app, ["download", "dinov2-b"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "2 of 3 weights are missing" in text and "decoder-dinov2-b" in text and "stats-dinov2-b" in text
    assert "offline mode is set" in text
    assert "RAE-collections/decoders/dinov2/wReg_base/ViTXL_n08/model.pt" in "".join(text.split())  # where to put it
    result = CliRunner().invoke(app, ["download", "no-such-bundle"])
    assert result.exit_code == 2 and "Bundles (named after presets)" in " ".join(result.output.split())


def test_download_list_shows_bundles_sizes_and_destinations(home):
    from typer.testing import CliRunner

    from rae_cli.cli import app

    _fake_present("stats-dinov2-b")
    result = CliRunner().invoke(app, ["download", "--list"])
    assert result.exit_code == 0, result.output
    bundles, artifacts = result.output.split("Artifacts")
    rows = {line.split()[0]: line for line in bundles.splitlines()[1:] if line.strip()}
    assert set(rows) == set(weights.BUNDLES)
    assert all(("GB" in row or "MB" in row) for row in rows.values())
    assert "1/3 present" in rows["dinov2-b"] and "1/4 present" in rows["dit-dh-xl_in256"]
    rows = {line.split()[0]: line for line in artifacts.splitlines()[1:] if line.strip()}
    assert set(rows) == set(weights.ARTIFACTS)
    assert "present" in rows["stats-dinov2-b"] and str(weights.resolve("stats-dinov2-b")) in rows["stats-dinov2-b"]
    assert "missing" in rows["decoder-dinov2-b"] and "RAE-collections" in rows["decoder-dinov2-b"]
