"""GAN loss terms against hand-computed values (spec §2.3)."""

from __future__ import annotations

import pytest
import torch

from rae_cli.gan_losses import GanSchedule, adaptive_weight, hinge_d_loss, quantize_fake, vanilla_g_loss


def test_hinge_d_loss_hand_values():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])  # relu(1 − real) = 0, 0.5, 2, 1 → mean 0.875
    fake = torch.tensor([[-2.0, 0.5], [0.0, -0.5]])  # relu(1 + fake) = 0, 1.5, 1, 0.5 → mean 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.875 + 0.75))
    # Confident and correct on both sides: zero loss.
    assert hinge_d_loss(torch.full((2, 3), 1.5), torch.full((2, 3), -1.0)).item() == 0.0


def test_vanilla_g_loss_is_minus_mean_raw_logits():
    logits = torch.tensor([[1.0, 2.0], [3.0, -2.0]], requires_grad=True)
    loss = vanilla_g_loss(logits)
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.full((2, 2), -0.25))


def _two_param_layer():
    # y = w·a with w = (1, 2), a = (3, 4): y = 11, ‖a‖ = 5.
    w = torch.tensor([[1.0, 2.0]], requires_grad=True)
    a = torch.tensor([3.0, 4.0])
    return w, a, (w @ a).squeeze()


def test_adaptive_weight_hand_values_and_retained_graph():
    w, a, y = _two_param_layer()
    rec = (y - 10.0) ** 2  # ∇w = 2(y − 10)·a = (6, 8), norm 10
    gan = -0.5 * y  # ∇w = −0.5·a = (−1.5, −2), norm 2.5
    d = adaptive_weight(rec, gan, w)
    assert d.item() == pytest.approx(10.0 / (2.5 + 1e-6), rel=1e-6)
    assert not d.requires_grad
    # Both graphs are still alive: the total loss backpropagates, and d acts as a constant.
    (rec + 0.75 * d * gan).backward()
    torch.testing.assert_close(w.grad, torch.tensor([[6.0, 8.0]]) + 0.75 * d * torch.tensor([[-1.5, -2.0]]))


def test_adaptive_weight_clamps_and_uses_eps():
    w, a, y = _two_param_layer()
    rec = (y - 10.0) ** 2  # norm 10
    assert adaptive_weight(rec, -1e-6 * y, w).item() == 1e4  # 10 / (5e-6 + 1e-6) ≈ 1.7e6 → clamped
    assert adaptive_weight(rec, -1e-6 * y, w, max_weight=50.0).item() == 50.0
    assert adaptive_weight(rec, 0.0 * y, w, eps=0.5).item() == pytest.approx(20.0)  # 10 / (0 + 0.5)
    # A reconstruction already at its optimum gets no GAN weight.
    w2, _, y2 = _two_param_layer()
    assert adaptive_weight((y2 - 11.0) ** 2, -y2, w2).item() == 0.0


def test_adaptive_weight_rejects_unrelated_loss():
    w, _, y = _two_param_layer()
    other = torch.tensor(1.0, requires_grad=True) * 3.0
    with pytest.raises(ValueError, match="GAN loss does not depend"):
        adaptive_weight((y - 1.0) ** 2, other, w)


def test_quantize_fake_hand_values():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.001, 0.5, 1.2])
    # (clamp(x)+1)·127.5 = 0, 0, 127.5, 127.6275, 191.25, 255 → round (half to even) 0, 0, 128, 128, 191, 255
    expected = torch.tensor([0.0, 0.0, 128.0, 128.0, 191.0, 255.0]) / 127.5 - 1.0
    q = quantize_fake(x)
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(quantize_fake(q), q)  # already on the 8-bit grid


def test_quantize_fake_carries_no_gradient():
    x = torch.zeros(3, requires_grad=True)
    assert not quantize_fake(x).requires_grad


def test_gan_schedule_official_steps():
    s = GanSchedule(lpips_start=0, disc_upd_start=6, disc_start=8, steps_per_epoch=2502)
    assert (s.lpips_start_step, s.disc_update_start_step, s.gan_start_step) == (0, 15012, 20016)
    assert s.use_lpips(0)
    assert not s.update_disc(15011) and s.update_disc(15012)
    assert not s.use_gan(20015) and s.use_gan(20016)


def test_gan_schedule_fractional_epochs_and_validation():
    s = GanSchedule(lpips_start=0.5, disc_upd_start=1.25, disc_start=2, steps_per_epoch=8)
    assert (s.lpips_start_step, s.disc_update_start_step, s.gan_start_step) == (4, 10, 16)
    assert not s.use_lpips(3) and s.use_lpips(4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        GanSchedule(0, 1, 2, steps_per_epoch=0)
    with pytest.raises(ValueError, match="disc_start"):
        GanSchedule(0, 1, -2, steps_per_epoch=10)


def test_adaptive_weight_under_fp16_needs_the_loss_scale():
    """fp16 autocast at a real batch size: the last layer's output gradient of a mean over 32 images of 3×256²
    (1/N ≈ 5e-8 per pixel) underflows fp16; taken of the scaled losses (as the backward pass is) it does not."""
    torch.manual_seed(0)
    last = torch.nn.Linear(4, 48)  # 48 outputs per token
    h, x, v = torch.randn(2 ** 17, 4), torch.rand(2 ** 17, 48), torch.randn(48)  # 2^17 × 48 = 32 × 3 × 256²

    def losses(precision: str, rows: int, gan_factor: float):
        with torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16"):
            recon = last(h[:rows]).float() * 0.25 + 0.5  # (rows, 48): fp16 output, pixel scale in fp32
            rec = (recon - x[:rows]).abs().mean()
            gan = -(recon @ v).float().mean() * gan_factor
        return rec, gan

    def d(precision: str, scale=None, rows: int = 2 ** 17, gan_factor: float = 1e-2) -> float:
        return adaptive_weight(*losses(precision, rows, gan_factor), last.weight, scale=scale).item()

    scale = torch.tensor(2.0 ** 16)
    ref = d("fp32")
    assert 1.0 < ref < 1e3
    assert d("fp16") > 2 * ref  # unscaled, the GAN gradients underflow to 0 or round to 6e-8 (the bug)
    assert d("fp16", scale) == pytest.approx(ref, rel=1e-2)
    assert d("fp32", scale) == pytest.approx(ref, rel=1e-5)  # the scale cancels out
    # A large GAN gradient (before d shrinks it) overflows at the loss scale: it is taken unscaled instead.
    _, gan = losses("fp16", 2 ** 10, 1e3)
    (g,) = torch.autograd.grad(gan * scale, last.weight)
    assert not torch.isfinite(g).all()
    assert d("fp16", scale, 2 ** 10, 1e3) == pytest.approx(d("fp32", None, 2 ** 10, 1e3), rel=1e-2)
