"""Differentiable augmentation of discriminator inputs (spec §2.6; DiffAugment as used by StyleGAN-T).

Translation → colour (brightness, saturation, contrast) → cutout, with per-sample random parameters. Each op is
a pure function of the image and its parameters; ``DiffAug`` draws the parameters from an explicit generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def max_translation(size: int, ratio: float = 0.125) -> int:
    """Largest shift in pixels along an axis of ``size`` pixels: round(ratio·size) (Python rounding, as official)."""
    return round(size * ratio)


def translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor) -> torch.Tensor:
    """Integer translation with zero fill: out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]] (0 outside).

    x: (B, C, H, W); shift_h, shift_w: (B,) integers. Differentiable in x.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) + shift_h.to(x.device).view(b, 1, 1)  # (B, H, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + shift_w.to(x.device).view(b, 1, 1)  # (B, 1, W)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (B, H, W)
    source = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)  # flat source index, (B, H, W)
    out = x.flatten(2).gather(2, source.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=x.dtype, device=x.device))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)  # (B,) → (B, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta[b] (delta ~ U(−0.5, 0.5) in DiffAug)."""
    return x + _per_sample(delta, x)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's deviation from its mean over channels: (x − m)·factor[b] + m (factor ~ U(0, 2))."""
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return (x - mean) * _per_sample(factor, x) + mean


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale the deviation from the image's global mean: (x − m)·factor[b] + m (factor ~ U(0.5, 1.5))."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - mean) * _per_sample(factor, x) + mean


def cutout(x: torch.Tensor, center_h: torch.Tensor, center_w: torch.Tensor, size_h: int, size_w: int
           ) -> torch.Tensor:
    """Zero a size_h × size_w window whose rows start at center_h[b] − size_h//2 (likewise columns), clipped to
    the image. center_h, center_w: (B,) integers."""
    b, _, h, w = x.shape
    top = (center_h.to(x.device) - size_h // 2).view(b, 1, 1)
    left = (center_w.to(x.device) - size_w // 2).view(b, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


@dataclass
class AugParams:
    """One batch's DiffAug draws: which ops run (whole batch) and each sample's parameters, all (B,) tensors."""

    translation: bool
    color: bool
    cutout: bool
    shift_h: torch.Tensor  # integers in [−round(r·H), round(r·H)]
    shift_w: torch.Tensor
    brightness: torch.Tensor  # U(−0.5, 0.5)
    saturation: torch.Tensor  # U(0, 2)
    contrast: torch.Tensor  # U(0.5, 1.5)
    center_h: torch.Tensor  # integers in [0, H − size_h % 2]
    center_w: torch.Tensor


class DiffAug:
    """DiffAugment with probability ``prob`` per op (drawn once per batch) and per-sample parameters.

    ``translation``: max shift as a fraction of the size; ``cutout``: window side as a fraction (0 = off).
    ``aug(x, generator)`` (or calling the object) returns an fp32 tensor. Uniforms come from ``generator`` in a
    fixed order: 3 op switches, then 7·B per-sample values (shift h, shift w, brightness, saturation, contrast,
    cutout h, cutout w), as in the official code.
    """

    def __init__(self, prob: float = 1.0, cutout: float = 0.0, translation: float = 0.125):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAug prob must be in [0, 1], got {prob}")
        if not 0.0 <= cutout <= 1.0 or not 0.0 <= translation <= 1.0:
            raise ValueError(f"DiffAug cutout and translation are fractions in [0, 1], got {cutout}, {translation}")
        self.prob = prob
        self.cutout = cutout
        self.translation = translation

    def __repr__(self) -> str:
        return f"DiffAug(prob={self.prob}, cutout={self.cutout}, translation={self.translation})"

    def cutout_size(self, h: int, w: int) -> tuple[int, int]:
        return round(h * self.cutout), round(w * self.cutout)

    def draw(self, batch: int, h: int, w: int, generator: torch.Generator | None = None) -> AugParams:
        """Draw the switches and per-sample parameters for a batch of (batch, ·, h, w) images (on CPU or the
        generator's device)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        switches = torch.rand(3, generator=generator, device=dev) <= self.prob  # always on at prob 1
        u = torch.rand(7, batch, generator=generator, device=dev)  # (7, B) in [0, 1)
        dh, dw = max_translation(h, self.translation), max_translation(w, self.translation)
        size_h, size_w = self.cutout_size(h, w)
        translation, color, cut = switches.tolist()
        return AugParams(
            translation=translation, color=color, cutout=cut and size_h > 0 and size_w > 0,
            shift_h=(u[0] * (2 * dh + 1)).floor().long() - dh,  # uniform integer in [−dh, dh]
            shift_w=(u[1] * (2 * dw + 1)).floor().long() - dw,
            brightness=u[2] - 0.5, saturation=u[3] * 2, contrast=u[4] + 0.5,
            center_h=(u[5] * (h + 1 - size_h % 2)).floor().long(),
            center_w=(u[6] * (w + 1 - size_w % 2)).floor().long(),
        )

    def apply(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """Translation → brightness → saturation → contrast → cutout, with the given parameters (fp32 out)."""
        if x.ndim != 4:
            raise ValueError(f"DiffAug expects images (B, C, H, W), got {tuple(x.shape)}")
        x = x.float()
        if p.translation:
            x = translate(x, p.shift_h, p.shift_w)
        if p.color:
            x = adjust_brightness(x, p.brightness)
            x = adjust_saturation(x, p.saturation)
            x = adjust_contrast(x, p.contrast)
        if p.cutout:
            x = cutout(x, p.center_h, p.center_w, *self.cutout_size(*x.shape[-2:]))
        return x

    def aug(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DiffAug expects images (B, C, H, W), got {tuple(x.shape)}")
        if self.prob <= 0.0:
            return x.float()
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], generator))

    __call__ = aug
