"""GAN terms of stage-1 decoder training (spec §2.3): hinge D loss, vanilla G loss on raw logits, the adaptive
weight of VQGAN/taming, the 8-bit quantisation of fakes shown to D, and the epoch schedule of the three losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5·(mean relu(1 − D(real)) + mean relu(1 + D(fake))), averaged over all logits (batch and tokens)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean D(fake): the official "vanilla" generator loss, on raw logits (no softplus; spec §2.3 step 6)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-6, scale: torch.Tensor | None = None) -> torch.Tensor:
    """d = ‖∇_W L_rec‖ / (‖∇_W L_gan‖ + eps), clamped to [0, max_weight] and detached (spec §2.3 step 7).

    W is the decoder's last layer (``decoder.decoder_pred.weight``). Both graphs are retained, so the caller can
    still backpropagate L_rec + disc_weight·d·L_gan. Call it outside autocast.

    ``scale`` (fp16): the GradScaler's loss scale as a tensor (``scaler.scale(torch.ones(()))``). Each gradient is
    then taken of the scaled loss, as in the backward pass, and unscaled in fp32: unscaled, the fp16 gradient of a
    mean over a real batch (32 images of 3×256² → 1/N ≈ 5e-8 per pixel) is at or below fp16's smallest subnormal,
    and d would be rounding noise. A loss whose scaled gradient overflows (a large one: the separate GAN gradient,
    before d shrinks it in the total) is differentiated unscaled instead. That check costs a host sync in fp16.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("adaptive_weight needs a last-layer weight that requires grad")

    def grad_norm(loss: torch.Tensor, name: str, s) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss.float() * s, last_layer_weight, retain_graph=True, allow_unused=True)
        if g is None:
            raise ValueError(f"the {name} loss does not depend on the last-layer weight given to adaptive_weight")
        return torch.linalg.vector_norm(g.float()) / s

    norms = []
    for name, loss in (("reconstruction", rec_loss), ("GAN", gan_loss)):
        norm = grad_norm(loss, name, 1.0 if scale is None else scale)
        if scale is not None and not torch.isfinite(norm):
            norm = grad_norm(loss, name, 1.0)
        norms.append(norm)
    rec_norm, gan_norm = norms
    return (rec_norm / (gan_norm + eps)).clamp(0.0, max_weight).detach()


@torch.no_grad()
def quantize_fake(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [−1, 1] and round-trip through 8 bits: round((x+1)·127.5)/127.5 − 1, so D sees image-like fakes.

    For the discriminator step only: no gradient (rounding has none). Ties round to even (``torch.round``).
    """
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


@dataclass(frozen=True)
class GanSchedule:
    """When each loss term switches on, given in epochs (as the official config) and checked in optimizer steps.

    lpips_start: LPIPS joins the reconstruction loss; disc_upd_start: the discriminator starts training;
    disc_start: the generator GAN term starts. Official: 0, 6, 8 epochs.
    """

    lpips_start: float
    disc_upd_start: float
    disc_start: float
    steps_per_epoch: int

    def __post_init__(self):
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        for name in ("lpips_start", "disc_upd_start", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0 epochs, got {getattr(self, name)}")

    def _step(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    @property
    def lpips_start_step(self) -> int:
        return self._step(self.lpips_start)

    @property
    def disc_update_start_step(self) -> int:
        return self._step(self.disc_upd_start)

    @property
    def gan_start_step(self) -> int:
        return self._step(self.disc_start)

    def use_lpips(self, step: int) -> bool:
        return step >= self.lpips_start_step

    def update_disc(self, step: int) -> bool:
        return step >= self.disc_update_start_step

    def use_gan(self, step: int) -> bool:
        return step >= self.gan_start_step
