"""Reconstruction metrics of the official stage-1 eval (spec §7, ``eval/ref_iqa.py``): PSNR and SSIM per image.

Images are float tensors (B, C, H, W) in [0, 1]. Each function returns a (B,) tensor; the reported number is its mean.
SSIM follows Wang et al. 2004 with an 11-tap Gaussian window (σ = 1.5), the window torchmetrics uses by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MSE_FLOOR = 1e-10  # official clamp: identical images give 20·log10(1/√1e-10) = 100 dB, not inf


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of the same shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1: 20·log10(1/√MSE) = −10·log10(MSE), MSE clamped at 1e-10. (B,)"""
    _check_pair(x, y)
    # Mean in float64 so a 20 dB image reads 20.0000, not 19.9999x, whatever the input dtype.
    mse = (x.float() - y.float()).pow(2).flatten(1).double().mean(dim=1).clamp_min(MSE_FLOOR)  # (B,)
    return -10.0 * torch.log10(mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (size,), centred on the middle tap."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, eq. 13), averaged over channels and valid window positions. (B,)

    Local means and (population) variances come from a separable Gaussian filter. Only positions where the whole
    window fits are averaged, as both torchmetrics (pads, then crops the border) and scikit-image
    (``gaussian_weights=True``, crops ``(win − 1)/2``) do, so padding never enters the number.
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {h}x{w}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    g = gaussian_window(window_size, sigma, dtype, x.device)
    # Depthwise separable filter: rows then columns, one group per channel.
    kh = g.view(1, 1, window_size, 1).expand(c, 1, window_size, 1)
    kw = g.view(1, 1, 1, window_size).expand(c, 1, 1, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, H − win + 1, W − win + 1)
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)  # (B,)


def psnr_ssim_means(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and mean SSIM over a batch, as the official eval reports them."""
    return {"psnr": psnr(x, y).mean().item(), "ssim": ssim(x, y).mean().item()}
