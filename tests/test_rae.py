"""RAE: parity with the official stage1.RAE (every intermediate of encode, and decode), stats, noise, freezing."""

from __future__ import annotations

import json

import pytest
import torch

from parity_fixtures import sub_state_dict
from rae_cli.checkpoint import strict_load, torch_load_weights
from rae_cli.decoder import decoder_from_hf_config
from rae_cli.encoders import load_encoder
from rae_cli.rae import RAE


def _build(parity, *, with_stats: bool = True, noise_tau: float | None = None) -> tuple[RAE, dict, dict]:
    """The fixture's RAE, built like the official constructor from the files in official_format/."""
    t, meta = parity("rae_encode")
    p, derived, root = meta["rae_params"], meta["decoder_derived"], parity.root
    encoder = load_encoder("dinov2", str(root / p["encoder_config_path"]))
    config = json.loads((root / p["decoder_config_path"] / "config.json").read_text())
    decoder = decoder_from_hf_config(config, latent_dim=derived["hidden_size"], patch_size=derived["patch_size"],
                                     num_patches=derived["num_patches"])
    strict_load(decoder, torch_load_weights(root / p["pretrained_decoder_path"]), "tiny decoder")
    stats = torch_load_weights(root / p["normalization_stat_path"]) if with_stats else {}
    rae = RAE(encoder, decoder, input_size=p["encoder_input_size"],
              noise_tau=p["noise_tau"] if noise_tau is None else noise_tau,
              latent_mean=stats.get("mean"), latent_var=stats.get("var"), eps=p["eps"])
    return rae.eval(), t, meta


@pytest.fixture(scope="module")
def built(parity):
    return _build(parity)


def image_keys(t: dict, meta: dict) -> tuple[str, str]:
    """(raw image key, encoder-size image key): the fixture names its input images by their size."""
    n = meta["rae_params"]["encoder_input_size"]
    raw = next(k for k in sorted(t) if k.startswith("input.image_") and k != f"input.image_{n}")
    return raw, f"input.image_{n}"


def _tiny(noise_tau: float = 0.0, with_stats: bool = True) -> RAE:
    """An inline tiny RAE (the rae/tiny preset: random-init 2-layer DINOv2 config, 32×4×4 latents), for the tests
    that need no official outputs."""
    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig

    rae = build_rae(resolve(RAEConfig, "tiny", [f"noise_tau={noise_tau}"]))
    if with_stats:
        g = torch.Generator().manual_seed(0)
        shape = rae.latent_shape
        rae.set_latent_stats(torch.randn(shape, generator=g), 0.5 + torch.rand(shape, generator=g))
    return rae.eval()


def _images(rae: RAE, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, rae.image_size + 8, rae.image_size + 8, generator=torch.Generator().manual_seed(seed))


def test_rae_encode_parity_all_intermediates(built):
    rae, t, meta = built
    raw, at_size = image_keys(t, meta)
    n = meta["rae_params"]["encoder_input_size"]
    seen = {}
    hooks = [
        rae.encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("pixels", args[0])),
        rae.encoder.encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out.last_hidden_state)),
        rae.encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("tokens", out)),
    ]
    z = rae.encode(t[raw])
    for h in hooks:
        h.remove()
    resized_normalized = (t[f"inter.image_resized_{n}"] - t["encoder_mean"]) / t["encoder_std"]
    torch.testing.assert_close(seen["pixels"], resized_normalized, atol=2e-6, rtol=0)
    torch.testing.assert_close(seen["hidden"], t["inter.encoder_last_hidden_state"], atol=2e-6, rtol=0)
    torch.testing.assert_close(seen["tokens"], t["inter.tokens_no_cls_reg"], atol=2e-6, rtol=0)
    torch.testing.assert_close(z, t["output.z"], atol=2e-6, rtol=0)
    torch.testing.assert_close(rae.encode(t[at_size]), t[f"output.z_from_{n}"], atol=2e-6, rtol=0)


def test_rae_decode_parity(built):
    rae, t, meta = built
    with torch.no_grad():
        x = rae.decode(t["output.z"])
    torch.testing.assert_close(x, t["output.decode_of_z"], atol=2e-6, rtol=0)
    with torch.no_grad():  # forward = decode(encode(x))
        torch.testing.assert_close(rae(t[image_keys(t, meta)[0]]), t["output.decode_of_z"], atol=1e-5, rtol=0)


def test_rae_parity_without_stats_is_identity_normalization(parity):
    rae, t, meta = _build(parity, with_stats=False)
    assert not rae.has_stats
    raw, _ = image_keys(t, meta)
    torch.testing.assert_close(rae.encode(t[raw]), t["inter.z_unnormalized"], atol=2e-6, rtol=0)


def test_rae_state_dicts_parity(built):
    rae, t, _ = built
    torch.testing.assert_close(rae.latent_mean, t["latent_mean"], atol=0, rtol=0)
    torch.testing.assert_close(rae.latent_var, t["latent_var"], atol=0, rtol=0)
    sd = rae.state_dict()
    # Stats and pixel constants are buffers but not weights: absent from every state dict.
    assert not any(k.startswith(("latent_", "image_")) for k in sd)
    expected = {f"encoder.{k}" for k in rae.encoder.state_dict()} | {f"decoder.{k}" for k in rae.decoder.state_dict()}
    assert set(sd) == expected
    official_encoder = sub_state_dict(t, "encoder_state_dict.")
    ours = sub_state_dict(rae.encoder.official_state_dict(), "encoder.")
    assert set(ours) == set(official_encoder)
    assert all(torch.equal(ours[k], official_encoder[k]) for k in official_encoder)
    official_decoder = sub_state_dict(t, "decoder_state_dict.")
    assert set(rae.decoder.state_dict()) == set(official_decoder)
    assert all(torch.equal(rae.decoder.state_dict()[k], v) for k, v in official_decoder.items())


def test_noise_only_in_training_uniform_sigma_per_sample():
    rae = _tiny(noise_tau=0.8, with_stats=False)
    x = _images(rae)
    clean = rae.encode(x)
    rae.train()
    assert rae.decoder.training and not rae.encoder.training  # the frozen encoder never trains
    noisy = rae.encode(x, generator=torch.Generator().manual_seed(3))
    again = rae.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)  # reproducible from the generator

    g = torch.Generator().manual_seed(3)  # the official draw order: σ = τ·U(0,1) per sample, then ε ~ N(0, I)
    B, (C, h, w) = len(x), rae.latent_shape
    sigma = 0.8 * torch.rand(B, 1, 1, generator=g)
    eps = torch.randn(B, h * w, C, generator=g)  # (B, N, C) tokens
    expected = clean + (sigma * eps).transpose(1, 2).reshape(clean.shape)
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=0)

    rae.noise_tau = 0.0
    torch.testing.assert_close(rae.encode(x), clean, atol=1e-6, rtol=0)


def test_gradients_reach_decoder_only():
    rae = _tiny().train()
    x = _images(rae)
    recon = rae(x)
    (recon - x[..., :rae.image_size, :rae.image_size]).abs().mean().backward()
    assert all(p.grad is None for p in rae.encoder.parameters())
    assert rae.decoder.decoder_pred.weight.grad is not None


def test_stats_shape_and_missing_entries():
    rae = _tiny()
    with pytest.raises(ValueError, match="latent shape"):
        rae.set_latent_stats(torch.zeros(3, 4, 4), None)
    mean = torch.randn(rae.latent_shape)
    mean_only = RAE(rae.encoder, rae.decoder, input_size=rae.input_size, latent_mean=mean)
    assert torch.equal(mean_only.latent_var, torch.ones_like(mean))  # official: missing var = 1


def test_from_encoder_and_input_checks():
    rae = _tiny()
    C, h, _ = rae.latent_shape
    fresh = RAE.from_encoder(rae.encoder, input_size=rae.input_size, decoder_size="ViT-B", decoder_patch_size=8)
    assert fresh.latent_shape == rae.latent_shape
    assert fresh.decoder.num_patches == h * h and fresh.decoder.hidden_size == 768
    assert fresh.image_size == 8 * h and fresh.has_stats is False
    with pytest.raises(ValueError, match="images"):
        rae.encode(torch.zeros(1, 1, rae.input_size, rae.input_size))
