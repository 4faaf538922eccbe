"""LPIPS-VGG (spec §2.4): the formula, freezing, weight files, and never downloading."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from rae_cli.checkpoint import CheckpointError
from rae_cli.perceptual import LPIPS, build_lpips, vgg16_features_to_lpips
from rae_cli.weights import WeightsNotFoundError, resolve

VGG16_FILENAME = "vgg16-397923af.pth"


@pytest.fixture(scope="module")
def lpips_random() -> LPIPS:
    torch.manual_seed(0)
    return build_lpips(random_init=True)


def _images(b: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _reference_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spec §2.4 written out: scaling layer, VGG relu{1_2..5_3}, channel unit-norm (eps 1e-10), squared
    difference, 1×1 lin without bias, spatial mean, sum over the 5 layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    vgg = model.net.net
    slices = [vgg.slice1, vgg.slice2, vgg.slice3, vgg.slice4, vgg.slice5]
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for k, s in enumerate(slices):
        hx, hy = s(hx), s(hy)
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        lin = model.net.lins[k].model[1].weight  # (1, C, 1, 1)
        total += F.conv2d((nx - ny) ** 2, lin).mean(dim=(1, 2, 3))
    return total


def test_identical_images_give_zero_and_different_images_positive(lpips_random):
    x, y = _images(2, 32, 0), _images(2, 32, 1)
    with torch.no_grad():
        assert torch.equal(lpips_random.distance(x, x), torch.zeros(2))
        d = lpips_random.distance(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_matches_the_spec_formula_and_forward_is_batch_mean(lpips_random):
    x, y = _images(3, 32, 2), _images(3, 32, 3)
    with torch.no_grad():
        d = lpips_random.distance(x, y)
        torch.testing.assert_close(d, _reference_lpips(lpips_random, x, y), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lpips_random(x, y), d.mean())


def test_lin_weights_are_the_packaged_v01_vgg_weights(lpips_random):
    shipped = torch.load(resolve("lpips-vgg-lin"), map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(lpips_random.net.lins[k].model[1].weight, shipped[f"lin{k}.model.1.weight"])
    assert [lpips_random.net.lins[k].model[1].weight.shape[1] for k in range(5)] == [64, 128, 256, 512, 512]


def test_frozen_eval_and_gradients_reach_the_input(lpips_random):
    assert not any(p.requires_grad for p in lpips_random.parameters())
    parent = torch.nn.Sequential(lpips_random).train()  # a parent switching to train must not enable dropout
    assert not lpips_random.training and not lpips_random.net.training
    x, y = _images(2, 32, 4), _images(2, 32, 5).requires_grad_(True)
    a = parent[0](x, y)
    torch.testing.assert_close(parent[0](x, y), a)  # deterministic: dropout off
    a.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_rejects_mismatched_shapes(lpips_random):
    with pytest.raises(ValueError, match="same shape"):
        lpips_random(_images(2, 32, 0), _images(2, 16, 0))


def test_missing_vgg_weights_raise_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(WeightsNotFoundError) as err:
        build_lpips()
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILENAME) in msg
    assert "rae download vgg16" in msg
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(tmp_path / "missing.pth"))):
        build_lpips(tmp_path / "missing.pth")


def test_loads_vgg_from_a_local_torchvision_file(tmp_path, lpips_random):
    # A torchvision-layout file (features.* and classifier.*), with weights unlike the random trunk's.
    torch.manual_seed(1)
    tv_sd = {}
    for name, value in lpips_random.net.net.state_dict().items():  # slice{s}.{i}.* → features.{i}.*
        tv_sd["features." + name.split(".", 1)[1]] = torch.randn_like(value) * 0.05
    tv_sd["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / VGG16_FILENAME
    torch.save(tv_sd, path)

    model = build_lpips(path)
    for name, value in model.net.net.state_dict().items():
        assert torch.equal(value, tv_sd["features." + name.split(".", 1)[1]]), name
    assert vgg16_features_to_lpips({"features.16.weight": torch.zeros(1)}) == {"slice4.16.weight": torch.zeros(1)}

    # The hub cache is found without a path.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "hub" / "checkpoints" / VGG16_FILENAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        cached = build_lpips()
    x, y = _images(1, 32, 6), _images(1, 32, 7)
    with torch.no_grad():
        torch.testing.assert_close(cached(x, y), model(x, y))


def test_incomplete_vgg_file_is_rejected(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        build_lpips(path)
