"""`rae encode` / `rae recon` end to end on the tiny (random-init) preset, and their behaviour on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rae_cli.cli import app

runner = CliRunner()


def _images(folder, n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / c / f"{i}.png")
    return folder


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("imgs"))


def test_encode_writes_latents_and_config(imgs, tmp_path):
    code, out = _run("encode", imgs, "--out", tmp_path / "enc", "--preset", "tiny", "dtype=bf16", "batch_size=4")
    assert code == 0, out
    from rae_cli.checkpoint import load_safetensors

    tensors, meta = load_safetensors(tmp_path / "enc" / "latents.safetensors")
    z = tensors["latents"]
    assert z.shape == (6, 32, 4, 4) and z.dtype == torch.bfloat16
    assert len(meta["files"]) == 6 and meta["encoder_random_init"] is True
    cfg = (tmp_path / "enc" / "config.yaml").read_text()
    assert "encoder_random_init: true" in cfg and "dtype: bf16" in cfg
    # Same images, same latents (the encoder is deterministic in eval mode); batch size does not matter.
    code, out = _run("encode", imgs, "--out", tmp_path / "enc1", "--preset", "tiny", "dtype=bf16", "batch_size=1")
    assert code == 0, out
    z1 = load_safetensors(tmp_path / "enc1" / "latents.safetensors")[0]["latents"]
    torch.testing.assert_close(z.float(), z1.float(), atol=1e-2, rtol=1e-2)


def test_encode_single_image(imgs, tmp_path):
    code, out = _run("encode", imgs / "cat" / "0.png", "--out", tmp_path / "one", "--preset", "tiny")
    assert code == 0, out
    from rae_cli.checkpoint import load_safetensors

    assert load_safetensors(tmp_path / "one" / "latents.safetensors")[0]["latents"].shape == (1, 32, 4, 4)


def test_recon_with_trained_decoder_file_and_stats(imgs, tmp_path):
    """A decoder saved by us and stats are picked up; reconstructions, grid and metrics are written."""
    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.latent_stats import save_stats
    from rae_cli.official import save_decoder
    from rae_cli.schema import RAEConfig

    rae = build_rae(resolve(RAEConfig, preset="tiny"))
    save_decoder(rae.decoder, tmp_path / "decoder.safetensors")
    save_stats(tmp_path / "stats.safetensors", torch.zeros(32, 4, 4), torch.ones(32, 4, 4), count=1)
    code, out = _run("recon", imgs, "--out", tmp_path / "rec", "--preset", "tiny",
                     f"rae.decoder_weights={tmp_path / 'decoder.safetensors'}",
                     f"rae.stats={tmp_path / 'stats.safetensors'}", "grid_images=4")
    assert code == 0, out
    m = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert m["num_images"] == 6 and len(m["per_image"]) == 6
    assert np.isfinite(m["psnr_mean"]) and -1 <= m["ssim_mean"] <= 1
    assert m["psnr_mean"] == pytest.approx(np.mean([r["psnr"] for r in m["per_image"]]))
    assert len(list((tmp_path / "rec" / "recon").glob("*.png"))) == 6
    grid = Image.open(tmp_path / "rec" / "grid.png")
    assert grid.size[0] > grid.size[1]  # 4 pairs side by side in one row
    assert (tmp_path / "rec" / "config.yaml").is_file()


def test_corrupt_image_is_a_clear_error_and_nothing_is_written(imgs, tmp_path):
    bad = tmp_path / "bad"
    _images(bad, n=2)
    (bad / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    for cmd in ("encode", "recon"):
        out_dir = tmp_path / f"out-{cmd}"
        code, out = _run(cmd, bad, "--out", out_dir, "--preset", "tiny")
        assert code == 2
        assert "broken.png" in out.replace("\n", "") and "Traceback" not in out  # the console may wrap a long path
        assert not out_dir.exists() or not any(out_dir.rglob("*.*"))


def test_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    code, out = _run("encode", tmp_path / "empty", "--out", tmp_path / "o", "--preset", "tiny")
    assert code == 2 and "no images found" in out
    code, out = _run("recon", tmp_path / "missing", "--out", tmp_path / "o", "--preset", "tiny")
    assert code == 2 and "not found" in out


def test_decoder_checkpoint_with_missing_key(imgs, tmp_path):
    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig

    rae = build_rae(resolve(RAEConfig, preset="tiny"))
    sd = rae.decoder.state_dict()
    sd.pop("decoder_norm.weight")
    torch.save(sd, tmp_path / "model.pt")  # official raw-state-dict layout, one key short
    code, out = _run("recon", imgs, "--out", tmp_path / "rec", "--preset", "tiny",
                     f"rae.decoder_weights={tmp_path / 'model.pt'}")
    assert code == 2
    assert "decoder_norm.weight" in out and "missing" in out
    assert not (tmp_path / "rec" / "metrics.json").exists()


def test_unknown_config_key_and_dry_run(imgs, tmp_path):
    code, out = _run("recon", imgs, "--out", tmp_path / "rec", "--preset", "tiny", "rae.decoder_widht=3")
    assert code == 2 and "rae.decoder_widht" in out and "decoder_hidden_size" in out
    code, out = _run("encode", imgs, "--out", tmp_path / "enc", "--preset", "tiny", "--dry-run", "batch_size=7")
    assert code == 0 and "batch_size: 7" in out and "encoder_random_init: true" in out
    assert not (tmp_path / "enc").exists()


def test_missing_pretrained_weights_name_the_download(imgs, tmp_path, monkeypatch):
    """The real presets need released weights: offline, the error says what to fetch and where."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    code, out = _run("encode", imgs, "--out", tmp_path / "enc", "--preset", "dinov2-b")
    assert code == 2
    assert "dinov2-with-registers-base" in out and "rae download" in out
    assert not (tmp_path / "enc").exists()


def test_download_offline_fails_at_once_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae-home"))
    code, out = _run("download", "decoder-dinov2-b")
    assert code == 2
    assert "offline" in out and "RAE-collections" in out and "rae download decoder-dinov2-b" in out
    code, out = _run("download", "no-such-thing")
    assert code == 2 and "unknown artifact" in out
    code, out = _run("download", "--list")
    assert code == 0 and "fid-inception" in out and "dino-vits8" in out
