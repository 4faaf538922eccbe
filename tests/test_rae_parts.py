"""Each command builds only the half of the autoencoder it uses, and a decoder with weights is built on the meta
device and materialised by the load: the outputs are the same as building both halves the old way."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dit_training_helpers import image_folder
from rae_cli.cli import app


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return res


def _tiny(**overrides):
    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig

    return resolve(RAEConfig, preset="tiny", overrides=[f"{k}={v}" for k, v in overrides.items()])


def forbid_decoder(monkeypatch):
    from rae_cli.decoder import ViTDecoder

    def boom(*a, **k):
        raise AssertionError("the decoder was built")

    monkeypatch.setattr(ViTDecoder, "__init__", boom)


def forbid_encoder(monkeypatch):
    import rae_cli.encoders

    def boom(*a, **k):
        raise AssertionError("the encoder was built")

    monkeypatch.setattr(rae_cli.encoders, "load_encoder", boom)


def build_both(monkeypatch):
    """The old behaviour: every command builds the encoder and the decoder."""
    import rae_cli.build

    real = rae_cli.build.build_rae
    monkeypatch.setattr(rae_cli.build, "build_rae", lambda cfg, device="cpu", parts=None: real(cfg, device))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("img") / "images", per_class=2, classes=2)


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    """A trained-looking tiny decoder (perturbed weights) saved in our format."""
    from rae_cli.build import build_rae
    from rae_cli.official import save_decoder

    dec = build_rae(_tiny(), parts={"decoder"}).decoder
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("dec") / "decoder.safetensors"
    save_decoder(dec, path)
    return path


def test_encode_and_cache_latents_build_no_decoder_and_write_the_same_latents(images, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    with monkeypatch.context() as m:
        forbid_decoder(m)
        invoke("encode", images, "--out", tmp_path / "enc", "-p", "tiny")
        invoke("cache-latents", images, "--out", tmp_path / "cache", "-p", "tiny", "shard_size=2")
    with monkeypatch.context() as m:
        build_both(m)
        invoke("encode", images, "--out", tmp_path / "enc-both", "-p", "tiny")
        invoke("cache-latents", images, "--out", tmp_path / "cache-both", "-p", "tiny", "shard_size=2")
    new, old = (load_file(tmp_path / d / "latents.safetensors") for d in ("enc", "enc-both"))
    assert new["latents"].shape == (4, 32, 4, 4)
    torch.testing.assert_close(new["latents"], old["latents"], rtol=0, atol=0)
    shards = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    assert len(shards) == 2
    for s in shards:
        a, b = load_file(s), load_file(tmp_path / "cache-both" / s.name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sample_builds_no_encoder_and_makes_the_same_images(decoder_file, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    args = ["-p", "tiny", "dit_random_init=true", "num_images=2", "num_steps=2", "batch_size=2",
            f"rae.decoder_weights={decoder_file}"]
    with monkeypatch.context() as m:
        forbid_encoder(m)
        invoke("sample", "--out", tmp_path / "new", *args)
    with monkeypatch.context() as m:
        build_both(m)
        invoke("sample", "--out", tmp_path / "old", *args)
    pngs = sorted(p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*.png") if p.stem != "grid")
    assert len(pngs) == 2
    for p in pngs:
        new, old = (np.asarray(Image.open(tmp_path / d / p)) for d in ("new", "old"))
        assert np.array_equal(new, old)


def test_one_half_refuses_the_other_halfs_job():
    from rae_cli.build import build_rae

    enc, dec = build_rae(_tiny(), parts={"encoder"}), build_rae(_tiny(), parts={"decoder"})
    assert enc.decoder is None and dec.encoder is None
    assert enc.latent_shape == dec.latent_shape == (32, 4, 4) and enc.image_size == dec.image_size == 32
    with pytest.raises(RuntimeError, match="without its decoder"):
        enc.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(RuntimeError, match="without its encoder"):
        dec.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="subset"):
        build_rae(_tiny(), parts={"decoder", "discriminator"})


def test_meta_build_plus_load_equals_the_random_init_then_load_path(decoder_file, init_spy):
    """The decoder with weights gets exactly the weights (and outputs) of the old build (random init, then a copying
    load), and no real-memory initialisation happens on the way: every Linear/LayerNorm init ran on meta tensors."""
    from rae_cli.build import build_rae, decoder_arch, load_decoder_weights
    from rae_cli.decoder import ViTDecoder

    cfg = _tiny(decoder_weights=decoder_file)
    old = ViTDecoder(**decoder_arch(cfg, 32, 16))
    load_decoder_weights(old, decoder_file)

    inits = init_spy  # tests/conftest.py; the reference decoder above ran real inits: start counting here
    inits.clear()
    rae = build_rae(cfg, parts={"decoder"}).eval()
    assert inits and all(inits), "a decoder with weights ran a real random init"
    new = rae.decoder
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers()])
    assert new.decoder_pos_embed.requires_grad is False and new.decoder_embed.weight.requires_grad
    assert all(p.dtype == torch.float32 for p in new.parameters())
    sd_old, sd_new = old.state_dict(), new.state_dict()
    assert sd_old.keys() == sd_new.keys()
    for k in sd_old:
        torch.testing.assert_close(sd_new[k], sd_old[k], rtol=0, atol=0)
    z = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = old.unpatchify(old(z.flatten(2).transpose(1, 2))) * rae.image_std + rae.image_mean
    torch.testing.assert_close(rae.decode(z), ref, rtol=0, atol=0)

    # The spy notices a real init: without weights the decoder is the seeded random init.
    inits.clear()
    build_rae(_tiny(), parts={"decoder"})
    assert not all(inits)


def test_decode_only_needs_no_encoder_files_but_missing_decoder_weights_say_what_to_download(tmp_path,
                                                                                              monkeypatch):
    from rae_cli.build import build_rae, encoder_info
    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig
    from rae_cli.weights import WeightsNotFoundError

    monkeypatch.setenv("RAE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = resolve(RAEConfig, preset="dinov2-b")
    info = encoder_info(cfg)  # nothing downloaded: the registry's architecture, on the meta device
    assert (info.hidden_size, info.patch_size, info.image_mean) == (768, 14, (0.485, 0.456, 0.406))
    with pytest.raises(WeightsNotFoundError, match="rae download decoder-dinov2-b"):
        build_rae(cfg, parts={"decoder"})
    with pytest.raises(WeightsNotFoundError, match="rae download dinov2-b"):  # the encoder itself still is needed
        build_rae(cfg, parts={"encoder"})


def test_train_dit_on_the_fly_builds_no_decoder(images, tmp_path, monkeypatch):
    forbid_decoder(monkeypatch)
    invoke("train-dit", "-p", "tiny", "--data", images, "--out", tmp_path / "run", "max_steps=1", "stats=none",
           "global_batch_size=4")
    assert (tmp_path / "run" / "checkpoints").is_dir()
