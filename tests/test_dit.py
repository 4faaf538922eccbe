"""Stage-2 models: official-key parity on the fixtures, inits, the registry sizes, the width rule, options."""

from __future__ import annotations

import logging

import pytest
import torch
from parity_fixtures import sub_state_dict

from rae_cli.checkpoint import CheckpointError, strict_load
from rae_cli.dit import DIT_REGISTRY, DiTDH, LightningDiT, build_dit, check_width, count_parameters
from rae_cli.dit_layers import RMSNorm, RotaryEmbedding2D, rotate_pairs, sincos_pos_embed_2d

MODELS = {"ditddh_small": DiTDH, "lightningdit_small": LightningDiT}


def _loaded(parity, name: str):
    tensors, meta = parity(name)
    model = MODELS[name](**meta["config"]).eval()
    strict_load(model, sub_state_dict(tensors, "state_dict."), f"{name} state_dict")
    return model, tensors, meta


def _scale_tol(ref: torch.Tensor, rel: float = 2e-6) -> float:
    return max(2e-6, rel * ref.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official models


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_parity(parity, name):
    model, tensors, _ = _loaded(parity, name)
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    ref = tensors["output.forward"]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=_scale_tol(ref), rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_fp64_parity(parity, name):
    model, tensors, _ = _loaded(parity, name)
    model.double()
    with torch.no_grad():
        out = model(tensors["input.x"].double(), tensors["input.t"].double(), tensors["input.y"])
    assert out.dtype == torch.float64
    # The official fp64 run still computes RMSNorm in fp32, as ours does, so the match is close.
    torch.testing.assert_close(out, tensors["output.forward_fp64"], atol=1e-5, rtol=0)
    # And the fp32 forward is within fp32 rounding of the fp64 reference.
    model.float()
    with torch.no_grad():
        out32 = model(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    torch.testing.assert_close(out32.double(), tensors["output.forward_fp64"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_parity(parity, name):
    model, tensors, meta = _loaded(parity, name)
    loss = (model(tensors["input.x"], tensors["input.t"], tensors["input.y"]) * tensors["grad.loss_weight"]).sum()
    loss.backward()
    params = dict(model.named_parameters())
    names = meta["grad_norm_names"]
    assert sorted(names) == sorted(n for n, p in params.items() if p.requires_grad)
    norms = torch.stack([params[n].grad.double().norm() for n in names])
    torch.testing.assert_close(norms, tensors["grad.norms"], rtol=1e-5, atol=1e-7)
    full = [k[len("grad."):] for k in tensors if k.startswith("grad.") and k not in ("grad.loss_weight", "grad.norms")]
    assert full, "fixture holds full gradients"
    for key in full:
        ref = tensors[f"grad.{key}"]
        torch.testing.assert_close(params[key].grad, ref, atol=_scale_tol(ref, 1e-6), rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_init_parity(parity, name):
    """A freshly built model has the official deterministic inits: sin-cos pos-embed, RoPE buffers, zero adaLN."""
    tensors, meta = parity(name)
    ref = sub_state_dict(tensors, "state_dict.")
    model = MODELS[name](**meta["config"])
    sd = model.state_dict()
    assert set(sd) == set(ref), "same key set as the official state dict"
    deterministic = [k for k in sd if k == "pos_embed" or "feat_rope" in k]
    assert "pos_embed" in deterministic and len(deterministic) >= 3
    for k in deterministic:
        assert torch.equal(sd[k], ref[k]), f"{k} differs from the official init"
    assert not model.pos_embed.requires_grad and not model.t_embedder.W.requires_grad
    for k, v in sd.items():
        if "adaLN_modulation" in k or k.startswith("final_layer.linear"):
            assert torch.count_nonzero(v) == 0, f"{k} is not zero at init"
    x = torch.randn_like(tensors["input.x"])
    with torch.no_grad():
        out = model.eval()(x, tensors["input.t"], tensors["input.y"])
    assert torch.count_nonzero(out) == 0, "adaLN-Zero: output is exactly 0 at init"


def test_strict_load_parity_rejects_wrong_keys(parity):
    tensors, meta = parity("ditddh_small")
    sd = sub_state_dict(tensors, "state_dict.")
    model = DiTDH(**meta["config"])
    bad = dict(sd)
    bad.pop("t_embedder.W")
    with pytest.raises(CheckpointError, match="t_embedder.W"):
        strict_load(model, bad, "test")
    wrong = LightningDiT(**parity("lightningdit_small")[1]["config"])
    with pytest.raises(CheckpointError, match="missing keys"):
        strict_load(wrong, sd, "test")


# ----------------------------------------------------------------------------------------------------------------
# Layers


def test_rmsnorm_fp32_compute_and_dtype():
    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    xb = (x * 1e3).bfloat16()
    out = norm(xb)
    assert torch.isfinite(out).all()


def test_rope_layout_and_rotation():
    rope = RotaryEmbedding2D(head_dim=8, grid_size=3)
    assert rope.freqs_cos.shape == (9, 8)
    # token (row 2, col 1): first half uses the row, second half the column; pairs are interleaved.
    f = torch.tensor([1.0, 1.0, 0.01, 0.01])  # theta^(−2k/4), k = 0, 1 for the per-axis dim 4
    expected = torch.cat([2 * f, 1 * f])
    torch.testing.assert_close(rope.freqs_cos[2 * 3 + 1], expected.cos())
    torch.testing.assert_close(rope.freqs_sin[2 * 3 + 1], expected.sin())
    assert torch.equal(rotate_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
    # a rotation keeps the norm of every pair
    q = torch.randn(2, 1, 9, 8)
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))
    assert "freqs_cos" in rope.state_dict()


def test_sincos_pos_embed_layout():
    emb = sincos_pos_embed_2d(8, 4)  # (16, 8): first 4 channels = column, last 4 = row
    assert emb.shape == (16, 8)
    col, row = 3, 1
    token = emb[row * 4 + col]
    omega = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(token[:4], torch.cat([(col * omega).sin(), (col * omega).cos()]))
    torch.testing.assert_close(token[4:], torch.cat([(row * omega).sin(), (row * omega).cos()]))


# ----------------------------------------------------------------------------------------------------------------
# Registry sizes on the meta device (no memory, no time)


@pytest.mark.parametrize("name,total,trainable", [
    ("DiT-DH-XL", 838.68, 838.38), ("DiT-DH-S", 196.46, 196.36), ("DiT-XL", 677.25, None),
    ("DiT-S", 33.65, None), ("DiT-B", 131.88, None), ("DiT-L", 459.92, None)])
def test_parameter_counts(name, total, trainable):
    with torch.device("meta"):
        model = build_dit(name, input_size=16, in_channels=768, num_classes=1000, allow_narrow=True)
    counts = count_parameters(model)
    assert round(counts.total / 1e6, 2) == total
    if trainable is not None:
        assert round(counts.trainable / 1e6, 2) == trainable
    # frozen: the sin-cos pos-embed (N·D) and t_embedder.W (256)
    assert counts.total - counts.trainable == model.pos_embed.numel() + 256


def test_state_dict_key_counts():
    with torch.device("meta"):
        xl = build_dit("DiT-DH-XL", input_size=16, in_channels=768, num_classes=1000)
        dit = build_dit("DiT-XL", input_size=16, in_channels=768, num_classes=1000)
    sd = xl.state_dict()
    assert len(sd) == 382
    assert sd["blocks.29.mlp.w12.weight"].shape == (10922, 2048)
    assert sd["enc_feat_rope.freqs_cos"].shape == (256, 72) and sd["dec_feat_rope.freqs_cos"].shape == (256, 128)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert len(dit.state_dict()) == 352
    assert dit.state_dict()["final_layer.adaLN_modulation.1.weight"].shape == (2304, 1152)


def test_registry_names_and_errors():
    assert set(DIT_REGISTRY) == {"DiT-S", "DiT-B", "DiT-L", "DiT-XL", "DiT-DH-S", "DiT-DH-B", "DiT-DH-L", "DiT-DH-XL"}
    with pytest.raises(ValueError, match="DiT-DH-XL"):
        build_dit("DiT-XXL", input_size=4, in_channels=8, num_classes=10)
    m = build_dit("DiT-DH-S", input_size=4, in_channels=8, num_classes=10, hidden_size=[16, 32], depth=[1, 1],
                  num_heads=[2, 2])
    assert isinstance(m, DiTDH) and m.encoder_hidden_size == 16 and len(m.blocks) == 2


# ----------------------------------------------------------------------------------------------------------------
# Width rule (Theorem 1)


def test_width_rule(caplog):
    check_width(768, 768, allow_narrow=False)  # equal is fine
    with caplog.at_level(logging.WARNING, logger="rae_cli.dit"):
        with pytest.raises(ValueError, match="allow_narrow"):
            check_width(384, 768, allow_narrow=False)
    assert "0.500" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rae_cli.dit"):
        check_width(512, 768, allow_narrow=True)
    assert "(n − d)/n = 0.333" in caplog.text


def test_build_dit_applies_width_rule(caplog):
    kw = dict(input_size=4, num_classes=10)
    with pytest.raises(ValueError, match="Theorem 1"):
        build_dit("DiT-S", in_channels=32, hidden_size=16, depth=1, num_heads=2, **kw)
    with caplog.at_level(logging.WARNING):
        m = build_dit("DiT-S", in_channels=32, hidden_size=16, depth=1, num_heads=2, allow_narrow=True, **kw)
    assert isinstance(m, LightningDiT) and "Theorem 1" in caplog.text
    # the token dimension is C·p²: 8 channels at patch 2 are 32-dimensional tokens
    with pytest.raises(ValueError):
        build_dit("DiT-S", in_channels=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, **kw)
    # DiT-DH is judged by its wide head: a narrow encoder with a head ≥ C is fine (DiT-DH-S on 768 channels)
    build_dit("DiT-DH-S", in_channels=32, hidden_size=[16, 32], depth=[1, 1], num_heads=[2, 2], **kw)
    with pytest.raises(ValueError):
        build_dit("DiT-DH-S", in_channels=32, hidden_size=[32, 16], depth=[1, 1], num_heads=[2, 2], **kw)


# ----------------------------------------------------------------------------------------------------------------
# Fixed official bugs and extra options


def _tiny_dh(**kw) -> DiTDH:
    cfg = dict(input_size=8, patch_size=1, in_channels=6, hidden_size=[16, 32], depth=[1, 1], num_heads=[2, 2],
               num_classes=5)
    cfg.update(kw)
    return DiTDH(**cfg)


def test_ditdh_patch2_without_rope_runs():
    torch.manual_seed(0)
    model = _tiny_dh(patch_size=2, use_rope=False).eval()
    assert model.x_embedder.proj.weight.shape == (32, 6, 2, 2)  # in_channels, not in_channels·p²
    assert not any("rope" in k for k in model.state_dict())
    x, t, y = torch.randn(3, 6, 8, 8), torch.rand(3), torch.tensor([0, 4, 5])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero at init
    for p in model.parameters():  # after training steps the output is non-trivial and the right shape
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == x.shape and out.abs().mean() > 0


def test_patch_unpatch_roundtrip_identity():
    """With an identity-like embedding and output, token order in/out agrees (catches unpatchify mistakes)."""
    torch.manual_seed(0)
    m = LightningDiT(input_size=4, patch_size=2, in_channels=3, hidden_size=12, depth=0, num_heads=3, num_classes=2,
                     use_rope=False, use_pos_embed=False, final_norm=False)
    # patch embed: weight maps patch pixel (c, i, j) to feature c·4 + i·2 + j (12 = 3·2·2)
    w = torch.zeros(12, 3, 2, 2)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                w[c * 4 + i * 2 + j, c, i, j] = 1.0
    m.x_embedder.proj.weight.data.copy_(w)
    # final linear: feature (c, i, j) → output slot (i, j, c) (official per-token order: row, col, channel)
    lin = torch.zeros(12, 12)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                lin[(i * 2 + j) * 3 + c, c * 4 + i * 2 + j] = 1.0
    m.final_layer.linear.weight.data.copy_(lin)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        out = m.eval()(x, torch.rand(2), torch.tensor([0, 1]))
    torch.testing.assert_close(out, x)


def test_learn_pos_embed_and_final_norm_options():
    m = _tiny_dh(learn_pos_embed=True, final_norm=False)
    assert m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_2d(16, 8))
    assert "final_layer.norm_final.weight" not in m.state_dict()
    assert count_parameters(m).total - count_parameters(m).trainable == 256  # only t_embedder.W frozen
    lm = LightningDiT(input_size=4, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                      learn_pos_embed=True)
    assert lm.pos_embed.requires_grad
    with pytest.raises(ValueError, match="use_pos_embed"):
        _tiny_dh(learn_pos_embed=True, use_pos_embed=False)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = _tiny_dh()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 6, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(x, t, y, force_drop_ids=torch.zeros(2)).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_label_dropout_generator_and_force_drop():
    model = _tiny_dh(class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.arange(5).repeat(20)
    null_row = emb.embedding_table.weight[5]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = emb(labels, True, generator=g1), emb(labels, True, generator=g2)
    assert torch.equal(a, b)  # reproducible from the generator
    dropped = (a == null_row).all(dim=1)
    assert 20 < dropped.sum() < 80
    forced = emb(labels[:3], False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced[0], null_row) and torch.equal(forced[2], null_row)
    assert torch.equal(forced[1], emb.embedding_table.weight[1])
    assert torch.equal(emb(labels, False), emb.embedding_table(labels))  # eval: no dropout
    no_null = _tiny_dh(class_dropout_prob=0.0).y_embedder
    assert no_null.embedding_table.num_embeddings == 5
    with pytest.raises(ValueError, match="null class"):
        no_null(labels[:2], False, force_drop_ids=torch.tensor([1, 1]))


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    model = _tiny_dh().eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 6, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_alternative_flags_gelu_layernorm_noshift_qknorm():
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                         num_classes=3, use_swiglu=False, use_rmsnorm=False, wo_shift=True, use_qknorm=True).eval()
    sd = model.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].shape == (64, 16) and "blocks.0.mlp.w12.weight" not in sd
    assert "blocks.0.norm1.weight" not in sd and "final_layer.norm_final.weight" not in sd  # LayerNorm, no affine
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (64, 16)  # 4D without shifts
    assert sd["blocks.0.attn.q_norm.weight"].shape == (8,)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        out = model(x, torch.rand(2), torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0


def test_bad_inputs_have_clear_errors():
    model = _tiny_dh()
    with pytest.raises(ValueError, match="8×8"):
        model(torch.randn(1, 6, 4, 4), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="patch sizes"):
        _tiny_dh(patch_size=[1, 2])
    with pytest.raises(ValueError, match="divisible"):
        LightningDiT(input_size=4, in_channels=4, hidden_size=18, depth=1, num_heads=4, num_classes=3)
