"""DiffAug ops against hand-computed values, and the random draws' ranges (spec §2.6)."""

from __future__ import annotations

import pytest
import torch

from rae_cli.diffaug import (DiffAug, adjust_brightness, adjust_contrast, adjust_saturation, cutout,
                             max_translation, translate)


def _grid(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)


def test_max_translation_uses_python_rounding():
    assert max_translation(256) == 32
    assert max_translation(224) == 28
    assert max_translation(20) == 2  # 2.5 rounds to even
    assert max_translation(28) == 4  # 3.5 rounds to even


def test_translate_hand_values():
    x = _grid(3, 4)  # rows [0..3], [4..7], [8..11]
    # out[i, j] = x[i + 1, j]: content moves up one row, the last row is zero-filled.
    out = translate(x, torch.tensor([1]), torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], torch.tensor([[4.0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 0, 0]]))
    # out[i, j] = x[i, j − 1]: content moves right one column, the first column is zero-filled.
    out = translate(x, torch.tensor([0]), torch.tensor([-1]))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10]]))


def test_translate_per_sample_shifts_and_channels():
    x = torch.cat([_grid(3, 3), _grid(3, 3) + 100]).repeat(1, 2, 1, 1)  # (2, 2, 3, 3)
    x[:, 1] *= -1
    out = translate(x, torch.tensor([-1, 0]), torch.tensor([1, 5]))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0, 0], [1, 2, 0], [4, 5, 0]]))
    torch.testing.assert_close(out[0, 1], -out[0, 0])  # every channel moves together
    torch.testing.assert_close(out[1], torch.zeros(2, 3, 3))  # a shift past the border leaves nothing


def test_translate_is_differentiable():
    x = _grid(3, 3).requires_grad_(True)
    translate(x, torch.tensor([1]), torch.tensor([1])).sum().backward()
    # Only the pixels that land inside the output receive gradient.
    torch.testing.assert_close(x.grad[0, 0], torch.tensor([[0.0, 0, 0], [0, 1, 1], [0, 1, 1]]))


def test_brightness_saturation_contrast_hand_values():
    pixel = torch.tensor([0.1, 0.2, 0.6]).view(1, 3, 1, 1)  # channel mean 0.3
    torch.testing.assert_close(adjust_brightness(pixel, torch.tensor([0.25])).flatten(),
                               torch.tensor([0.35, 0.45, 0.85]))
    torch.testing.assert_close(adjust_saturation(pixel, torch.tensor([2.0])).flatten(),
                               torch.tensor([-0.1, 0.1, 0.9]))
    torch.testing.assert_close(adjust_saturation(pixel, torch.tensor([0.0])).flatten(), torch.full((3,), 0.3))

    img = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)  # global mean 1.5
    torch.testing.assert_close(adjust_contrast(img, torch.tensor([0.5])).flatten(),
                               torch.tensor([0.75, 1.25, 1.75, 2.25]))


def test_colour_ops_are_per_sample():
    x = torch.ones(2, 3, 2, 2)
    x[:, 0] = 0.0  # channel means 2/3 everywhere
    out = adjust_saturation(x, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], torch.full((3, 2, 2), 2 / 3))
    # Contrast uses each image's own mean over (C, H, W).
    y = torch.stack([torch.zeros(1, 2, 2), torch.tensor([[[0.0, 4.0], [0.0, 4.0]]])])
    torch.testing.assert_close(adjust_contrast(y, torch.tensor([1.5, 1.5]))[1, 0],
                               torch.tensor([[-1.0, 5.0], [-1.0, 5.0]]))


def test_cutout_hand_values_and_border_clipping():
    x = torch.ones(2, 1, 4, 4)
    out = cutout(x, torch.tensor([1, 0]), torch.tensor([2, 0]), 2, 2)
    # Sample 0: rows 1 − 1 .. 1, cols 2 − 1 .. 2 zeroed.
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]))
    # Sample 1: the window starts at (−1, −1) and is clipped to the top-left pixel.
    expected = torch.ones(4, 4)
    expected[0, 0] = 0
    torch.testing.assert_close(out[1, 0], expected)


def test_draws_cover_their_documented_ranges():
    aug = DiffAug(prob=1.0, cutout=0.25)
    p = aug.draw(20000, 16, 24, torch.Generator().manual_seed(0))
    assert p.translation and p.color and p.cutout
    assert set(p.shift_h.tolist()) == set(range(-2, 3))  # round(0.125·16) = 2
    assert set(p.shift_w.tolist()) == set(range(-3, 4))  # round(0.125·24) = 3
    for v, lo, hi in ((p.brightness, -0.5, 0.5), (p.saturation, 0.0, 2.0), (p.contrast, 0.5, 1.5)):
        assert lo <= v.min().item() < lo + 0.01 and hi - 0.01 < v.max().item() < hi
    # Cutout sizes round(0.25·16) = 4 (even → centres 0..16), round(0.25·24) = 6 (even → centres 0..24).
    assert set(p.center_h.tolist()) == set(range(0, 17))
    assert set(p.center_w.tolist()) == set(range(0, 25))


def test_switches_follow_prob_and_cutout_zero_is_off():
    assert not DiffAug(prob=1.0, cutout=0.0).draw(2, 8, 8, torch.Generator().manual_seed(0)).cutout
    g = torch.Generator().manual_seed(1)
    on = [DiffAug(prob=0.3).draw(1, 8, 8, g).color for _ in range(4000)]
    assert 0.27 < sum(on) / len(on) < 0.33


def test_aug_composes_translation_colour_cutout_in_order():
    aug = DiffAug(prob=1.0, cutout=0.5)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = aug(x, torch.Generator().manual_seed(7))
    p = aug.draw(3, 8, 8, torch.Generator().manual_seed(7))  # the same draws
    expected = translate(x, p.shift_h, p.shift_w)
    expected = adjust_brightness(expected, p.brightness)
    expected = adjust_saturation(expected, p.saturation)
    expected = adjust_contrast(expected, p.contrast)
    expected = cutout(expected, p.center_h, p.center_w, 4, 4)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(8)))


def test_constant_black_image_becomes_its_brightness_draw():
    # On a zero image translation fills with zeros, saturation and contrast have no deviation to scale:
    # each output image is the constant brightness draw, uniform on [−0.5, 0.5).
    out = DiffAug()(torch.zeros(4000, 3, 4, 4), torch.Generator().manual_seed(3))
    per_image = out.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert -0.5 <= per_image.min().item() < -0.49 and 0.49 < per_image.max().item() < 0.5
    assert abs(per_image[:, 0].mean().item()) < 0.02


def test_output_is_fp32_and_differentiable_and_prob_zero_is_identity():
    x = (torch.rand(2, 3, 8, 8) * 2 - 1).to(torch.bfloat16).requires_grad_(True)
    out = DiffAug()(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(DiffAug(prob=0.0)(y), y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prob"):
        DiffAug(prob=1.5)
    with pytest.raises(ValueError, match="cutout"):
        DiffAug(cutout=-0.1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        DiffAug()(torch.zeros(3, 8, 8))
