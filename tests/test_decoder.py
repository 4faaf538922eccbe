"""ViTDecoder: parity with the official GeneralDecoder, key layout, init, sizes, attention paths, checkpointing."""

from __future__ import annotations

import pytest
import torch

from parity_fixtures import sub_state_dict
from rae_cli.checkpoint import strict_load
from rae_cli.decoder import DECODER_SIZES, ViTDecoder, decoder_from_hf_config, decoder_from_size, sincos_pos_embed_2d


def _fixture_decoder(parity, attn_impl="sdpa"):
    tensors, meta = parity("decoder_small")
    decoder = decoder_from_hf_config(meta["config"], num_patches=meta["num_patches"], attn_impl=attn_impl)
    strict_load(decoder, sub_state_dict(tensors, "state_dict."), "decoder_small state_dict")
    return decoder.eval(), tensors


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_decoder_parity_logits_and_image(parity, attn_impl):
    decoder, t = _fixture_decoder(parity, attn_impl)
    with torch.no_grad():
        logits = decoder(t["input.z_tokens"])
        torch.testing.assert_close(logits, t["output.logits"], atol=2e-6, rtol=0)
        torch.testing.assert_close(decoder.unpatchify(logits), t["output.image"], atol=2e-6, rtol=0)
        # 5x5 latent grid: bilinearly resized to the decoder's 4x4 grid first.
        torch.testing.assert_close(decoder(t["input.z_tokens_5x5"]), t["output.logits_from_5x5"], atol=2e-6, rtol=0)


def test_decoder_parity_fp64(parity):
    decoder, t = _fixture_decoder(parity, "eager")
    with torch.no_grad():
        out = decoder.double()(t["input.z_tokens"].double())
    torch.testing.assert_close(out, t["output.logits_fp64"], atol=1e-12, rtol=0)


def test_decoder_init_parity_pos_embed_and_zero_cls(parity):
    """A freshly built decoder has the official deterministic parts: sin-cos pos-embed, zero CLS, same keys."""
    tensors, meta = parity("decoder_small")
    official = sub_state_dict(tensors, "state_dict.")
    decoder = decoder_from_hf_config(meta["config"], num_patches=meta["num_patches"])
    ours = decoder.state_dict()
    assert set(ours) == set(official)
    assert all(ours[k].shape == official[k].shape for k in ours)
    torch.testing.assert_close(ours["decoder_pos_embed"], official["decoder_pos_embed"], atol=1e-7, rtol=0)
    assert not decoder.decoder_pos_embed.requires_grad
    assert torch.all(decoder.decoder_pos_embed[0, 0] == 0)  # the CLS slot
    assert torch.all(decoder.trainable_cls_token == 0) and decoder.trainable_cls_token.requires_grad


def test_sincos_layout_columns_then_rows():
    """First D/2 channels depend only on the column, the last D/2 only on the row (token i*w + j)."""
    g, d = 3, 16
    emb = sincos_pos_embed_2d(d, g, cls_token=False).view(g, g, d)  # (row, col, D)
    assert torch.allclose(emb[0, :, : d // 2], emb[2, :, : d // 2])  # same column half for every row
    assert torch.allclose(emb[:, 0, d // 2:], emb[:, 2, d // 2:])  # same row half for every column
    assert torch.allclose(emb[0, 1, 0], torch.tensor(0.8414709848))  # sin(1·ω_0), ω_0 = 1, column 1


def test_sdpa_matches_eager_random_weights():
    torch.manual_seed(0)
    decoder = ViTDecoder(24, 64, 2, 4, 96, patch_size=2, num_patches=9)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(3, 9, 24)
    with torch.no_grad():
        decoder.set_attn_impl("sdpa")
        a = decoder(z)
        decoder.set_attn_impl("eager")
        b = decoder(z)
    assert decoder.attn_impl == "eager"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_impl"):
        decoder.set_attn_impl("flash")


@pytest.mark.parametrize("name,total,trainable", [
    ("ViT-B", 86.44, 86.24), ("ViT-L", 304.15, 303.89), ("ViT-XL", 415.35, 415.06)])
def test_param_counts_on_meta(name, total, trainable):
    with torch.device("meta"):
        decoder = decoder_from_size(name, latent_dim=768, patch_size=16, num_patches=256)
    n_total = sum(p.numel() for p in decoder.parameters())
    n_train = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
    assert round(n_total / 1e6, 2) == total
    assert round(n_train / 1e6, 2) == trainable
    hidden, depth, heads, mlp = DECODER_SIZES[name]
    assert (decoder.hidden_size, decoder.depth, decoder.num_heads, decoder.intermediate_size) == (
        hidden, depth, heads, mlp)


def test_unpatchify_order_row_col_channel():
    p, side = 2, 3
    decoder = ViTDecoder(8, 16, 1, 2, 32, patch_size=p, num_patches=side * side)
    logits = torch.arange(side * side * p * p * 3, dtype=torch.float32).view(1, side * side, p * p * 3)
    img = decoder.unpatchify(logits)
    assert img.shape == (1, 3, side * p, side * p)
    for i, j, r, q, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (2, 1, 0, 1, 1)]:
        token = i * side + j
        assert img[0, c, i * p + r, j * p + q] == logits[0, token, (r * p + q) * 3 + c]


def test_grad_checkpointing_recomputes_and_matches():
    torch.manual_seed(1)
    decoder = ViTDecoder(8, 16, 2, 2, 32, patch_size=2, num_patches=4).train()
    z = torch.randn(2, 4, 8)
    calls = []
    layer = decoder.decoder_layers[0]
    forward = layer.forward
    layer.forward = lambda h: (calls.append(1), forward(h))[1]  # counts recomputations too (hooks do not)

    decoder(z).square().sum().backward()
    plain = [p.grad.clone() for p in decoder.parameters() if p.requires_grad]
    assert len(calls) == 1

    decoder.zero_grad()
    calls.clear()
    decoder.grad_checkpointing = True
    decoder(z).square().sum().backward()
    assert len(calls) == 2  # forward, then the recomputation during backward
    for a, p in zip(plain, [p for p in decoder.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)

    calls.clear()
    with torch.no_grad():  # no checkpointing when there is nothing to backpropagate
        decoder(z)
    assert len(calls) == 1


def test_hf_config_parity_needs_patch_size_and_gelu(parity):
    _, meta = parity("decoder_small")
    cfg = dict(meta["config"], patch_size="SHOULD BE RELOADED")
    with pytest.raises(ValueError, match="patch_size"):
        decoder_from_hf_config(cfg)
    assert decoder_from_hf_config(cfg, patch_size=4).patch_size == 4
    with pytest.raises(ValueError, match="GELU"):
        decoder_from_hf_config(dict(meta["config"], hidden_act="relu"))


def test_bad_inputs_raise():
    decoder = ViTDecoder(8, 16, 1, 2, 32, patch_size=2, num_patches=4)
    with pytest.raises(ValueError, match="latent tokens"):
        decoder(torch.zeros(1, 4, 7))
    with pytest.raises(ValueError, match="square"):
        decoder(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="square"):
        ViTDecoder(8, 16, 1, 2, 32, patch_size=2, num_patches=5)
