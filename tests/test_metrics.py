"""PSNR and SSIM (rae_cli.metrics) against known values and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rae_cli.metrics import gaussian_window, psnr, psnr_ssim_means, ssim


def _images(seed: int, b: int = 3, c: int = 3, h: int = 32, w: int = 40, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=dtype)


def test_psnr_identical_images_is_clamped_to_100_db():
    x = _images(0)
    out = psnr(x, x.clone())
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 100.0, dtype=out.dtype))


def test_psnr_constant_offset_of_0_1_is_20_db():
    x = _images(1) * 0.9
    out = psnr(x + 0.1, x)
    assert torch.allclose(out, torch.full_like(out, 20.0), atol=1e-9)
    # float32 inputs give the same number to float32 precision
    out32 = psnr((x + 0.1).float(), x.float())
    assert torch.allclose(out32, torch.full_like(out32, 20.0), atol=1e-4)


def test_psnr_is_per_image():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1   # MSE 1e-2 → 20 dB
    y[1] += 0.01  # MSE 1e-4 → 40 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64), atol=1e-4)


def test_psnr_matches_definition_on_random_images():
    x, y = _images(2), _images(3)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), 20 * torch.log10(1 / mse.sqrt()), atol=1e-10)


def test_gaussian_window_is_normalised_and_symmetric():
    g = gaussian_window(11, 1.5, torch.float64)
    assert g.shape == (11,)
    assert math.isclose(g.sum().item(), 1.0, abs_tol=1e-12)
    assert torch.allclose(g, g.flip(0))
    assert g.argmax().item() == 5
    assert math.isclose((g[6] / g[5]).item(), math.exp(-1 / (2 * 1.5**2)), rel_tol=1e-12)


def test_ssim_of_identical_images_is_one():
    x = _images(4)
    assert torch.allclose(ssim(x, x.clone()), torch.ones(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_ssim_matches_skimage(dtype, atol):
    from skimage.metrics import structural_similarity

    x = _images(5, dtype=torch.float64)
    # a correlated pair: the target is a noisy, slightly darkened copy, so SSIM is far from 0 and from 1
    y = (0.8 * x + 0.2 * _images(6, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(x.to(dtype), y.to(dtype))
    assert ours.dtype == dtype and ours.shape == (3,)
    for i in range(3):
        ref = structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert 0.1 < ref < 0.99
        assert abs(ours[i].item() - ref) < atol, (i, ours[i].item(), ref)


def test_ssim_matches_skimage_on_single_channel_smooth_images():
    from skimage.metrics import structural_similarity

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24, dtype=torch.float64),
                            torch.linspace(0, 1, 30, dtype=torch.float64), indexing="ij")
    x = (0.5 + 0.5 * torch.sin(6 * xx + 3 * yy))[None, None]
    y = (x * 0.7 + 0.1 + 0.05 * torch.cos(20 * yy)).clamp(0, 1)
    ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert abs(ssim(x, y).item() - ref) < 1e-10


def test_ssim_drops_when_structure_is_destroyed():
    x = _images(7)
    mild = (x + 0.05 * _images(8)).clamp(0, 1)
    assert ssim(x, mild).min() > ssim(x, _images(9)).max()


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


def test_psnr_ssim_means_are_means_of_the_per_image_values():
    x, y = _images(10), _images(11)
    out = psnr_ssim_means(x, y)
    assert set(out) == {"psnr", "ssim"}
    assert math.isclose(out["psnr"], psnr(x, y).mean().item(), rel_tol=1e-12)
    assert math.isclose(out["ssim"], ssim(x, y).mean().item(), rel_tol=1e-12)
    assert isinstance(out["psnr"], float) and np.isfinite(out["ssim"])
