"""Frozen encoders: DINOv2 parity with the official wrapper, MAE/SigLIP2 loading and token layout,
random init, missing-weights errors, and the pretrained EfficientNet-Lite0."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from parity_fixtures import sub_state_dict
from rae_cli.encoders import (ENCODERS, RANDOM_INIT_WARNING, EfficientNetLite0Encoder, efficientnet_lite0_classifier,
                              load_encoder)
from rae_cli.weights import WeightsNotFoundError


def _no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae_home"))


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    """A tiny DINOv2-with-registers folder written by save_pretrained from the inline tiny config
    (presets/_assets/tiny-dinov2-reg), for the tests that need no official outputs."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from rae_cli.config import presets_root

    assets = presets_root() / "_assets" / "tiny-dinov2-reg"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "tiny-dinov2-reg"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig.from_pretrained(assets)).save_pretrained(path)
    shutil.copy(assets / "preprocessor_config.json", path)
    return path


@pytest.fixture(scope="module")
def tiny_mae_dir(tmp_path_factory):
    """A tiny ViT-MAE pretraining checkpoint written by save_pretrained (the hub's on-disk layout)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    cfg = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=32, image_size=32, patch_size=16)
    path = tmp_path_factory.mktemp("mae") / "tiny-mae"
    ViTMAEForPreTraining(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny full SigLIP (text + vision) checkpoint, as the SigLIP2 fixed-resolution repos are."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = SiglipConfig(vision_config=dict(tower, image_size=32, patch_size=16),
                       text_config=dict(tower, vocab_size=50000))
    path = tmp_path_factory.mktemp("siglip") / "tiny-siglip"
    SiglipModel(cfg).save_pretrained(path)
    return path


def _assert_standardized(tokens: torch.Tensor):
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:-1]), atol=1e-3, rtol=0)


def _file_tensors(path, prefix):
    from safetensors.torch import load_file

    return {k[len(prefix):]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# DINOv2


def _fixture_encoder_dir(parity, meta):
    return str(parity.root / meta["rae_params"]["encoder_config_path"])


def test_dinov2_encoder_parity(parity):
    t, meta = parity("rae_encode")
    enc = load_encoder("dinov2", _fixture_encoder_dir(parity, meta))
    assert enc.num_prefix_tokens == 1 + meta["dinov2_config"]["num_register_tokens"]
    assert enc.hidden_size == meta["dinov2_config"]["hidden_size"]
    assert enc.patch_size == meta["dinov2_config"]["patch_size"]
    assert enc.image_mean == tuple(meta["preprocessor"]["image_mean"])
    assert enc.image_std == tuple(meta["preprocessor"]["image_std"])
    n = meta["rae_params"]["encoder_input_size"]
    x = (t[f"inter.image_resized_{n}"] - t["encoder_mean"]) / t["encoder_std"]
    with torch.no_grad():
        hidden = enc.encoder(pixel_values=x).last_hidden_state
        tokens = enc(x)
    torch.testing.assert_close(hidden, t["inter.encoder_last_hidden_state"], atol=2e-6, rtol=0)
    torch.testing.assert_close(tokens, t["inter.tokens_no_cls_reg"], atol=2e-6, rtol=0)
    _assert_standardized(tokens)


def test_dinov2_state_dict_parity_official_keys_without_final_layernorm(parity):
    t, meta = parity("rae_encode")
    enc = load_encoder("dinov2", _fixture_encoder_dir(parity, meta))
    assert not any("layernorm" in k for k in enc.state_dict())
    official = sub_state_dict(t, "encoder_state_dict.")
    ours = sub_state_dict(enc.official_state_dict(), "encoder.")
    assert set(ours) == set(official)
    for k in official:
        assert torch.equal(ours[k], official[k]), k
    # and back: a state dict with the official names loads strictly
    perturbed = {f"encoder.{k}": v + 1 for k, v in official.items()}
    enc.load_official_state_dict(perturbed)
    assert torch.equal(enc.encoder.embeddings.cls_token, official["embeddings.cls_token"] + 1)


def test_encoder_is_frozen_and_stays_in_eval(tiny_dino_dir):
    enc = load_encoder("dinov2", str(tiny_dino_dir))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())


def test_local_copy_under_rae_home_is_used(tiny_dino_dir, monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    shutil.copytree(tiny_dino_dir, tmp_path / "rae_home" / "encoders" / "dinov2-b")
    enc = load_encoder("dinov2-b")
    hidden = json.loads((tiny_dino_dir / "config.json").read_text())["hidden_size"]
    assert enc.hidden_size == hidden != ENCODERS["dinov2-b"].config["hidden_size"] and not enc.is_random_init


# ---------------------------------------------------------------------------------------------------
# MAE


def test_mae_encoder_loads_official_keys_and_keeps_spatial_order(tiny_mae_dir):
    from transformers import ViTMAEModel

    enc = load_encoder("mae", str(tiny_mae_dir))
    assert (enc.hidden_size, enc.patch_size) == (32, 16)
    assert not any("layernorm.weight" == k.split("model.", 1)[1] for k in enc.state_dict())
    saved = {k: v for k, v in _file_tensors(tiny_mae_dir, "vit.").items() if not k.startswith("layernorm.")}
    ours = sub_state_dict(enc.official_state_dict(), "model.")
    assert set(ours) == set(saved)
    assert all(torch.equal(ours[k], saved[k]) for k in saved)

    # At 64 px (pos-embed interpolated 2x2 -> 4x4): a random shuffle, undone with ids_restore, must give the
    # same tokens as the identity noise (the encoder is permutation-equivariant after the pos-embed).
    ref = ViTMAEModel.from_pretrained(str(tiny_mae_dir), mask_ratio=0.0, local_files_only=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(x)
        out = ref(pixel_values=x, noise=torch.rand(2, 16), interpolate_pos_encoding=True, output_hidden_states=True)
    shuffled = out.hidden_states[-1][:, 1:]  # before the final LayerNorm
    restored = torch.gather(shuffled, 1, out.ids_restore.unsqueeze(-1).expand(-1, -1, 32))
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, F.layer_norm(restored, (32,), eps=1e-12), atol=1e-5, rtol=1e-5)
    _assert_standardized(tokens)


# ---------------------------------------------------------------------------------------------------
# SigLIP2


def test_siglip2_encoder_all_tokens_no_post_layernorm_affine(tiny_siglip_dir):
    from transformers import SiglipVisionModel

    enc = load_encoder("siglip2", str(tiny_siglip_dir))
    assert enc.image_mean == (0.5, 0.5, 0.5) and enc.image_std == (0.5, 0.5, 0.5)
    assert not any(k.startswith("model.post_layernorm") for k in enc.state_dict())
    assert any(k.startswith("model.head.") for k in enc.state_dict())  # kept for the official key layout
    saved = {k: v for k, v in _file_tensors(tiny_siglip_dir, "vision_model.").items()
             if not k.startswith("post_layernorm.")}
    ours = sub_state_dict(enc.official_state_dict(), "model.")
    assert set(ours) == set(saved)
    assert all(torch.equal(ours[k], saved[k]) for k in saved)

    ref = SiglipVisionModel.from_pretrained(str(tiny_siglip_dir), local_files_only=True).eval()
    x = torch.randn(2, 3, 64, 64)  # 4x4 tokens from a 2x2 pos-embed grid
    with torch.no_grad():
        tokens = enc(x)
        hidden = ref(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]
    assert tokens.shape == (2, 16, 32)  # every token: SigLIP has no CLS
    torch.testing.assert_close(tokens, F.layer_norm(hidden, (32,), eps=1e-6), atol=1e-5, rtol=1e-5)


def test_pixel_stats_come_from_preprocessor_config(tiny_siglip_dir, tmp_path):
    folder = tmp_path / "siglip"
    shutil.copytree(tiny_siglip_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                 "image_std": [0.4, 0.5, 0.6]}))
    enc = load_encoder("siglip2", str(folder))
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (0.4, 0.5, 0.6)


# ---------------------------------------------------------------------------------------------------
# Random init and missing weights


def test_random_init_is_marked_logged_and_deterministic(caplog):
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with caplog.at_level(logging.WARNING, logger="rae_cli.encoders"):
        a = load_encoder("dinov2-b", random_init=True, config_overrides=tiny)
    assert a.is_random_init
    assert RANDOM_INIT_WARNING in caplog.text
    b = load_encoder("dinov2-b", random_init=True, config_overrides=tiny)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.num_prefix_tokens == 5 and a.patch_size == 14
    assert a(torch.randn(1, 3, 28, 28)).shape == (1, 4, 32)

    mae = load_encoder("mae-b", random_init=True, config_overrides=dict(tiny, intermediate_size=64))
    assert mae(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32)
    sig = load_encoder("siglip2-b", random_init=True, config_overrides=dict(tiny, intermediate_size=64))
    assert sig(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32)
    noreg = load_encoder("dinov2-b-noreg", random_init=True, config_overrides=tiny)
    assert noreg.num_prefix_tokens == 1


def test_registry_matches_paper_encoders():
    assert ENCODERS["dinov2-b"].input_size == 224 and ENCODERS["dinov2-b"].config["patch_size"] == 14
    assert ENCODERS["siglip2-b"].input_size == 256 and ENCODERS["mae-b"].input_size == 256
    with pytest.raises(KeyError, match="dinov2-b"):
        load_encoder("dinov3-b")
    with pytest.raises(ValueError, match="source"):
        load_encoder("dinov2")


def test_missing_weights_offline_raise_clear_error(monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        load_encoder("dinov2", "rae-test-org/definitely-not-cached")
    assert "rae-test-org/definitely-not-cached" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)

    try:
        load_encoder("dinov2-b")
    except WeightsNotFoundError as e:
        msg = str(e)
        assert "facebook/dinov2-with-registers-base" in msg
        assert "rae download dinov2-b" in msg
        assert str(tmp_path / "rae_home" / "encoders" / "dinov2-b") in msg
    else:
        pytest.skip("dinov2-b is in the local Hugging Face cache")


def test_incomplete_local_folder_is_reported(tmp_path, monkeypatch):
    _no_network(monkeypatch, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="not a complete"):
        load_encoder("dinov2", str(tmp_path / "empty"))


def test_checkpoint_missing_weights_is_an_error(tiny_dino_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    _no_network(monkeypatch, tmp_path)
    folder = tmp_path / "partial"
    shutil.copytree(tiny_dino_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.mlp.fc1.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsNotFoundError, match="uninitialized"):  # never silently random weights
        load_encoder("dinov2", str(folder))


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_efficientnet_lite0_is_really_pretrained_classifies_chelsea_as_cat():
    from skimage.data import chelsea

    model = efficientnet_lite0_classifier()
    img = torch.from_numpy(chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    img = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    enc = EfficientNetLite0Encoder(efficientnet_lite0_classifier(), stride=8)
    mean, std = torch.tensor(enc.image_mean).view(1, 3, 1, 1), torch.tensor(enc.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model((img - mean) / std).softmax(-1)
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"predicted ImageNet class {top}"  # tabby .. Egyptian cat
    assert probs[0, 281:286].sum() > 0.5

    random = efficientnet_lite0_classifier(random_init=True)
    with torch.no_grad():
        assert random((img - mean) / std).softmax(-1)[0, 281:286].sum() < 0.5


def test_efficientnet_encoder_tokens():
    enc = load_encoder("efficientnet-lite0", stride=8)
    assert (enc.hidden_size, enc.patch_size) == (40, 8)
    assert not enc.is_random_init and not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(x)
    assert tokens.shape == (2, 64, 40)
    _assert_standardized(tokens)
    assert load_encoder("efficientnet-lite0", stride=16).hidden_size == 112
    with pytest.raises(ValueError, match="stride"):
        load_encoder("efficientnet-lite0", stride=3)


def test_default_input_size_is_the_registry_encoders():
    """rae.encoder=siglip2-b without a preset: 256 px in, so 16×16 latents (224 would give 14×14)."""
    from rae_cli.config import ConfigError, resolve
    from rae_cli.schema import RAEConfig

    for name in ("dinov2-b", "siglip2-b", "mae-b"):
        cfg = resolve(RAEConfig, None, [f"encoder={name}"])
        assert cfg.encoder_input_size == ENCODERS[name].input_size
        assert cfg.encoder_input_size // ENCODERS[name].config["patch_size"] == 16
    assert resolve(RAEConfig, None, ["encoder=siglip2-b", "encoder_input_size=512"]).encoder_input_size == 512
    with pytest.raises(ConfigError, match="encoder_input_size"):  # a bare family has no registry size
        resolve(RAEConfig, None, ["encoder=dinov2", "encoder_source=some/folder"])
