"""Official on-disk formats: decoder model.pt, stat.pt, stage-2 checkpoints; conversion and round trips."""

from __future__ import annotations

import json

import pytest
import torch

from parity_fixtures import sub_state_dict
from rae_cli.checkpoint import CheckpointError, load_safetensors, torch_load_weights
from rae_cli.decoder import ViTDecoder
from rae_cli.latent_stats import load_stats
from rae_cli.official import (ARCH_KEYS, convert_decoder, convert_stage2, convert_stats, export_decoder_official,
                              infer_decoder_arch, load_decoder, load_decoder_weights, load_official_decoder,
                              load_stage2_state_dict)

DECODER_PT = "official_format/tiny_decoder_model.pt"
DECODER_CONFIG = "official_format/tiny-decoder-config"
STAT_PT = "official_format/tiny_stat.pt"
STAGE2_PT = "official_format/tiny_stage2_model.pt"


def test_load_official_decoder_parity(parity):
    t, meta = parity("rae_encode")
    decoder = load_official_decoder(parity.root / DECODER_PT, parity.root / DECODER_CONFIG)
    derived = meta["decoder_derived"]
    assert decoder.latent_dim == derived["hidden_size"]
    assert decoder.patch_size == derived["patch_size"] and decoder.num_patches == derived["num_patches"]
    assert decoder.num_heads == meta["decoder_config_overrides"]["decoder_num_attention_heads"]
    official = sub_state_dict(t, "decoder_state_dict.")
    assert set(decoder.state_dict()) == set(official)
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in official.items())
    with torch.no_grad():  # and it computes the official decode
        z = t["output.z"] * torch.sqrt(t["latent_var"] + 1e-5) + t["latent_mean"]
        img = decoder.unpatchify(decoder.eval()(z.flatten(2).transpose(1, 2))) * t["encoder_std"] + t["encoder_mean"]
    torch.testing.assert_close(img, t["output.decode_of_z"], atol=2e-6, rtol=0)


def test_convert_decoder_round_trip_parity(parity, tmp_path):
    src = parity.root / DECODER_PT
    arch = convert_decoder(src, tmp_path / "decoder.safetensors", parity.root / DECODER_CONFIG)
    tensors, meta = load_safetensors(tmp_path / "decoder.safetensors")
    original = torch_load_weights(src)
    assert set(tensors) == set(original)  # exactly the official keys
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    assert meta["format"] == "rae-decoder-v1"
    assert all(meta["arch"][k] == arch[k] for k in ARCH_KEYS)

    rebuilt = load_decoder(tmp_path / "decoder.safetensors")  # no config needed any more
    assert rebuilt.arch() == arch

    export_decoder_official(tmp_path / "decoder.safetensors", tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)

    fresh = ViTDecoder(**arch)
    load_decoder_weights(fresh, tmp_path / "model.pt")
    assert torch.equal(fresh.decoder_pred.weight, original["decoder_pred.weight"])


@pytest.mark.parametrize("key", ["decoder_layers.1.output.dense.bias", "decoder_embed.weight", "trainable_cls_token"])
def test_missing_key_is_named_parity(parity, tmp_path, key):
    sd = torch_load_weights(parity.root / DECODER_PT)
    del sd[key]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_official_decoder(tmp_path / "broken.pt", parity.root / DECODER_CONFIG)


def test_unexpected_key_and_config_mismatch_are_errors_parity(parity, tmp_path):
    sd = torch_load_weights(parity.root / DECODER_PT)
    torch.save({**sd, "decoder_extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="decoder_extra.weight"):
        load_official_decoder(tmp_path / "extra.pt", parity.root / DECODER_CONFIG)
    config = json.loads((parity.root / DECODER_CONFIG / "config.json").read_text())
    depth = config["decoder_num_hidden_layers"] + 1
    with pytest.raises(CheckpointError, match=f"depth={depth}"):
        load_official_decoder(parity.root / DECODER_PT, {**config, "decoder_num_hidden_layers": depth})
    with pytest.raises(CheckpointError, match="attention heads"):  # a tiny width is no registered size
        load_official_decoder(parity.root / DECODER_PT)


def test_decoder_from_stage1_checkpoint_with_prefixes_parity(parity, tmp_path):
    sd = torch_load_weights(parity.root / DECODER_PT)
    ckpt = {"step": 3, "model": {f"module.decoder.{k}": v + 1 for k, v in sd.items()},
            "ema": {f"module.decoder.{k}": v for k, v in sd.items()} | {"module.encoder.x": torch.zeros(1)}}
    torch.save(ckpt, tmp_path / "stage1.pt")
    decoder = load_official_decoder(tmp_path / "stage1.pt", parity.root / DECODER_CONFIG)
    assert torch.equal(decoder.decoder_embed.weight, sd["decoder_embed.weight"])  # ema, not model


def test_arch_inferred_from_shapes_for_registered_width():
    with torch.device("meta"):
        sd = ViTDecoder(768, 1152, 28, 16, 4096, patch_size=16, num_patches=256).state_dict()
    arch = infer_decoder_arch(sd)
    assert arch["num_heads"] == 16 and arch["depth"] == 28 and arch["intermediate_size"] == 4096
    assert arch["patch_size"] == 16 and arch["num_patches"] == 256 and arch["latent_dim"] == 768
    assert infer_decoder_arch(sd, "ViT-XL")["num_heads"] == 16
    with pytest.raises(CheckpointError, match="hidden_size"):
        infer_decoder_arch(sd, "ViT-L")


def test_stats_official_and_converted_parity(parity, tmp_path):
    t, _ = parity("rae_encode")
    mean, var = load_stats(parity.root / STAT_PT)
    assert torch.equal(mean, t["latent_mean"]) and torch.equal(var, t["latent_var"])
    convert_stats(parity.root / STAT_PT, tmp_path / "stats.safetensors")
    mean2, var2 = load_stats(tmp_path / "stats.safetensors")
    assert torch.equal(mean2, mean) and torch.equal(var2, var)


def test_stage2_checkpoint_variants_parity(parity, tmp_path):
    raw = torch_load_weights(parity.root / STAGE2_PT)
    assert torch.equal(next(iter(load_stage2_state_dict(parity.root / STAGE2_PT).values())), next(iter(raw.values())))

    plus_one = {k: v + 1 for k, v in raw.items()}
    cases = {
        "ema.pt": {"ema": raw},
        "train.pt": {"step": 10, "epoch": 1, "model": plus_one, "ema": raw, "optimizer": {}, "scheduler": {}},
        "model_only.pt": {"model": {f"module._orig_mod.{k}": v for k, v in raw.items()}},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        sd = load_stage2_state_dict(tmp_path / name)
        assert set(sd) == set(raw), name
        assert all(torch.equal(sd[k], raw[k]) for k in raw), name
    sd = load_stage2_state_dict(tmp_path / "train.pt", prefer="model")
    assert all(torch.equal(sd[k], plus_one[k]) for k in raw)

    torch.save({"optimizer": {}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'ema' or 'model'"):
        load_stage2_state_dict(tmp_path / "bad.pt")

    convert_stage2(tmp_path / "train.pt", tmp_path / "stage2.safetensors", metadata={"model": "tiny"})
    tensors, meta = load_safetensors(tmp_path / "stage2.safetensors")
    assert set(tensors) == set(raw) and meta["model"] == "tiny"
    back = load_stage2_state_dict(tmp_path / "stage2.safetensors")
    assert all(torch.equal(back[k], raw[k]) for k in raw)
