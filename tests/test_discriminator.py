"""DINO discriminator (spec §2.5): heads, key layout, parameter count, frozen backbone, weight loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rae_cli.checkpoint import CheckpointError
from rae_cli.discriminator import (BatchNormLocal, DinoDiscriminator, Residual, build_dino_discriminator,
                                   build_dino_vit, make_head)
from rae_cli.weights import WeightsNotFoundError

# A tiny backbone: 32 px, patch 8 → 16 tokens; depth 4 with every block a key depth → 5 maps, as in S_8.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, key_depths=(0, 1, 2, 3), ks=3)
TINY_VIT = {k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}


@pytest.fixture(scope="module")
def disc() -> DinoDiscriminator:
    torch.manual_seed(0)
    d = DinoDiscriminator(**TINY)
    with torch.no_grad():  # a non-trivial backbone: random qkv biases, non-zero cls/pos embeddings
        for name, p in d.backbone.vit.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.normal_(0, 0.1)
    return d.eval()


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_batchnormlocal_hand_values_per_sample():
    bn = BatchNormLocal(2, eps=1e-6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])  # (1, 2, 4): mean 2.5, biased var 1.25
    expected = torch.tensor([[[-1.5, -0.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]]]) / math.sqrt(1.25 + 1e-6)
    expected = expected * torch.tensor([2.0, 1.0]).view(1, 2, 1) + torch.tensor([0.5, -1.0]).view(1, 2, 1)
    torch.testing.assert_close(bn(x), expected)
    # No batch statistics: a sample's output does not depend on the rest of the batch; output is fp32.
    other = torch.randn(3, 2, 4)
    torch.testing.assert_close(bn(torch.cat([x, other]))[:1], bn(x))
    assert bn(x.to(torch.bfloat16)).dtype == torch.float32


def test_residual_scales_by_inverse_sqrt2():
    r = Residual(torch.nn.Identity())
    x = torch.tensor([1.0, -2.0])
    torch.testing.assert_close(r(x), 2 * x / math.sqrt(2))


def test_head_is_equivariant_to_circular_token_shifts():
    # k=1 convs and the per-sample norm act per token, the k=9 conv pads circularly: rolling the tokens
    # rolls the logits. Zero padding would break this at the ends.
    torch.manual_seed(0)
    head = make_head(8, kernel_size=9).eval()
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        torch.testing.assert_close(head(x.roll(5, dims=-1)), head(x).roll(5, dims=-1), atol=1e-5, rtol=1e-5)


def test_spectral_norm_power_iteration_normalises_weights():
    torch.manual_seed(0)
    head = make_head(16, kernel_size=3).train()
    conv = head[1].fn[0]
    with torch.no_grad():
        conv.weight_orig.mul_(5.0)
    assert torch.linalg.matrix_norm(conv.weight_orig.detach().flatten(1), ord=2).item() > 2.0
    for _ in range(50):  # each training forward runs one power iteration
        head(torch.randn(1, 16, 10))
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, abs=1e-3)


def test_official_state_dict_layout_and_no_backbone_state(disc):
    keys = set(disc.state_dict())
    expected = set()
    for i in range(5):
        for conv in ("0.0", "1.fn.0", "2"):
            expected |= {f"heads.{i}.{conv}.{n}" for n in ("weight_orig", "weight_u", "weight_v", "bias")}
        for norm in ("0.1", "1.fn.1"):
            expected |= {f"heads.{i}.{norm}.{n}" for n in ("weight", "bias")}
    assert keys == expected
    assert all(name.startswith("heads.") for name, _ in disc.named_parameters())
    assert all(name.startswith("heads.") for name, _ in disc.named_buffers())


def test_full_size_trainable_parameter_count():
    d = DinoDiscriminator()  # ViT-S/8 recipe, random backbone
    trainable = sum(p.numel() for p in d.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in d.parameters()) == 5 * 1_477_249
    assert sum(p.numel() for p in d.backbone.parameters()) > 21_000_000  # frozen and not counted
    assert d.backbone.vit.pos_embed.shape == (1, 785, 384)
    assert d.num_tokens == 784


def _reference_features(vit_sd: dict, x: torch.Tensor, img_size: int, patch: int, heads: int, depth: int,
                        keep: tuple[int, ...]) -> list[torch.Tensor]:
    """DINO ViT written out by hand: tanh GELU, LN eps 1e-6, materialised softmax attention, no final norm."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x + 1) / 2 - mean) / std
    x = F.conv2d(x, vit_sd["patch_embed.proj.weight"], vit_sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = torch.cat([vit_sd["cls_token"].expand(b, 1, d), x], 1) + vit_sd["pos_embed"]
    ln = lambda t, p: F.layer_norm(t, (d,), vit_sd[p + ".weight"], vit_sd[p + ".bias"], eps=1e-6)  # noqa: E731
    maps = []
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), vit_sd[p + "attn.qkv.weight"], vit_sd[p + "attn.qkv.bias"])
        q, k, v = qkv.view(b, n + 1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n + 1, d), vit_sd[p + "attn.proj.weight"],
                         vit_sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), vit_sd[p + "mlp.fc1.weight"], vit_sd[p + "mlp.fc1.bias"]),
                   approximate="tanh")
        x = x + F.linear(h, vit_sd[p + "mlp.fc2.weight"], vit_sd[p + "mlp.fc2.bias"])
        if i in keep:
            maps.append(x[:, 1:].transpose(1, 2))
    return [x[:, 1:].transpose(1, 2)] + maps


def test_backbone_features_match_hand_written_dino(disc):
    x = _images(2, 40)  # resized to 32 inside
    sd = disc.backbone.vit.state_dict()
    expected = _reference_features(sd, x, 32, 8, 3, 4, TINY["key_depths"])
    with torch.no_grad():
        got = disc.backbone(x)
    assert len(got) == 5 and got[0].shape == (2, 48, 16)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], got[4])  # the last key depth is the final block


def test_logits_are_heads_on_maps_concatenated(disc):
    x = _images(3, 32)
    with torch.no_grad():
        logits = disc(x)
        maps = disc.backbone(x)
        per_head = [head(m).flatten(1) for head, m in zip(disc.heads, maps)]
    assert logits.shape == (3, 5 * 16)
    torch.testing.assert_close(logits, torch.cat(per_head, 1))
    # Heads are initialised independently, so the two heads fed the same map still disagree.
    assert not torch.allclose(logits[:, :16], logits[:, 64:])


def test_gradients_reach_input_and_heads_but_not_backbone(disc):
    x = _images(2, 32).requires_grad_(True)
    disc.zero_grad()
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None and not p.requires_grad for p in disc.backbone.parameters())
    disc.zero_grad()


def test_train_mode_keeps_backbone_in_eval(disc):
    disc.train()
    try:
        assert disc.heads.training and not disc.backbone.training
    finally:
        disc.eval()


def test_to_moves_and_casts_the_unregistered_backbone():
    torch.manual_seed(0)
    d = DinoDiscriminator(**TINY).eval()
    x = _images(2, 32)
    with torch.no_grad():
        ref = d(x)
        d.to(torch.float64)
        assert d.backbone.vit.pos_embed.dtype == torch.float64 and d.backbone.x_scale.dtype == torch.float64
        # fp64 vs an fp32 reference: fp32 round-off (it depends on the thread count) bounds the agreement.
        torch.testing.assert_close(d(x.double()), ref.double(), atol=1e-4, rtol=1e-4)


def test_key_depths_beyond_depth_are_dropped_and_bad_values_rejected():
    d = DinoDiscriminator(**{**TINY, "key_depths": (2, 5, 8, 11)})
    assert d.key_depths == (2,) and len(d.heads) == 2
    with pytest.raises(ValueError, match="key_depths"):
        DinoDiscriminator(**{**TINY, "key_depths": (-1, 2)})
    with pytest.raises(ValueError, match="odd"):
        DinoDiscriminator(**{**TINY, "ks": 4})


def test_heads_state_dict_round_trip(disc):
    torch.manual_seed(1)
    other = DinoDiscriminator(**TINY).eval()
    other.backbone.vit.load_state_dict(disc.backbone.vit.state_dict())
    x = _images(2, 32)
    with torch.no_grad():
        assert not torch.allclose(other(x), disc(x))
        other.load_state_dict(disc.state_dict())
        torch.testing.assert_close(other(x), disc(x))


def _fake_dino_file(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    vit = build_dino_vit(**TINY_VIT)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    for k in sd:
        if k.endswith("bias") or k in ("cls_token", "pos_embed"):
            sd[k].normal_(0, 0.2)
    path = tmp_path / "dino_tiny.pth"
    torch.save(sd, path)
    return path, sd


def test_build_loads_backbone_and_zeroes_key_bias(tmp_path):
    path, sd = _fake_dino_file(tmp_path)
    d = build_dino_discriminator(path, **TINY).eval()
    got = d.backbone.vit.state_dict()
    c = 48
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            assert torch.equal(got[k][:c], v[:c]) and torch.equal(got[k][2 * c:], v[2 * c:])
            assert torch.count_nonzero(got[k][c:2 * c]) == 0
        else:
            assert torch.equal(got[k], v), k
    # A key bias shifts every score of a query equally, so zeroing it leaves the features unchanged.
    raw = DinoDiscriminator(**TINY).eval()
    raw.backbone.vit.load_state_dict(sd)
    x = _images(2, 32)
    with torch.no_grad():
        for a, b in zip(d.backbone(x), raw.backbone(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_build_rejects_mismatched_checkpoint(tmp_path):
    path, sd = _fake_dino_file(tmp_path)
    sd.pop("norm.weight")
    sd["head.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing keys: norm.weight.*unexpected keys: head.weight"):
        build_dino_discriminator(path, **TINY)


def test_missing_weights_name_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae"))
    with pytest.raises(WeightsNotFoundError) as err:
        build_dino_discriminator(**TINY)
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth") in msg
    assert "rae download dino-vits8" in msg
    with pytest.raises(WeightsNotFoundError, match=r"nope\.pth.*rae download dino-vits8"):
        build_dino_discriminator(tmp_path / "nope.pth", **TINY)


def test_finds_weights_in_the_hub_cache(tmp_path, monkeypatch):
    path, sd = _fake_dino_file(tmp_path)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    d = build_dino_discriminator(**TINY)
    assert torch.equal(d.backbone.vit.pos_embed, sd["pos_embed"])


def test_random_init_needs_no_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae"))
    d = build_dino_discriminator(random_init=True, **TINY)
    assert d(_images(1, 32)).shape == (1, 80)
    assert "RANDOM backbone" in caplog.text
