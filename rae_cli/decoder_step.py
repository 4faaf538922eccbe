"""One train-decoder iteration (spec §2.3): a generator step on the noisy latents, then discriminator steps.

Differences from the official trainer (spec §10.1), each on purpose: the generator step calls the bare
discriminator with its parameters frozen, so it neither accumulates nor all-reduces D gradients; the discriminator
heads train through their own DDP wrapper (all-reduced); gradient accumulation uses ``no_sync``; fp16 keeps one
GradScaler per optimizer. Random draws come from (seed, rank, step, tag, micro-batch) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rae_cli.train_decoder_config import TrainDecoderConfig

# Random streams: every draw is seeded by derive_seed(seed, rank, step, ...) so that resume = rerun.
_NOISE, _AUG_G, _AUG_FAKE, _AUG_REAL = 1, 2, 3, 4


@dataclass
class StepContext:
    """The pieces one training step needs; ``generator_step`` and ``disc_step`` are spec §2.3's two halves."""

    cfg: TrainDecoderConfig
    plan: Any
    dist: Any
    rae: Any  # the bare RAE (its decoder is the trained module)
    rae_model: Any  # the RAE, DDP-wrapped when distributed
    disc: Any  # the bare discriminator
    disc_model: Any  # the discriminator, DDP-wrapped when distributed
    lpips: Any
    diffaug: Any
    schedule: Any
    autocast: Any

    def _gen(self, step: int, *tags: int) -> torch.Generator:
        from rae_cli.distributed import generator

        return generator(self.cfg.train.seed, self.dist.rank, step, *tags, device=self.rae.image_mean.device)

    def _no_sync(self, model, last: bool):
        """Skip the all-reduce on all but the last micro-batch of a step (working gradient accumulation)."""
        from rae_cli.training.session import accumulation_context

        return accumulation_context(model, last=last, distributed=self.dist.enabled)

    def _check_finite(self, opt: torch.optim.Optimizer, scaler, step: int, loss: float, grad_norm: float) -> None:
        """The NaN guard before an optimizer step: the loss (and, outside fp16, the gradient norm) averaged over
        processes must be finite — the same verdict on every rank. The 1-based ``step`` is the fault point's."""
        from rae_cli import faults
        from rae_cli.distributed import all_reduce_mean
        from rae_cli.training.guard import NonFiniteError, check_step

        if faults.nonfinite("loss", step):
            loss = float("nan")
        values = torch.tensor([loss, grad_norm], dtype=torch.float64, device=self.dist.device)
        loss, grad_norm = all_reduce_mean(values, self.dist).tolist()
        try:
            check_step(loss, 0.0 if scaler.is_enabled() else grad_norm)  # fp16: the scaler skips overflowed steps
        except NonFiniteError:
            opt.zero_grad(set_to_none=True)
            raise

    def generator_step(self, images: list[torch.Tensor], step: int, opt: torch.optim.Optimizer,
                       scaler) -> dict[str, float]:
        """L1 + LPIPS (+ adaptive-weighted GAN) on the noisy-latent reconstructions; one optimizer step."""
        from rae_cli.gan_losses import adaptive_weight
        from rae_cli.training.fsdp import plain

        cfg, sched = self.cfg.loss, self.schedule
        use_lpips, use_gan = sched.use_lpips(step), cfg.gan_enabled and sched.use_gan(step)
        # The bare discriminator, frozen and in eval mode: gradients reach the fakes only, so the G step neither
        # fills D's .grad nor triggers D's all-reduce (official: it runs through the DDP wrapper, spec §10.1 #8).
        if self.disc is not None:
            self.disc.eval().requires_grad_(False)
        loss_scale = scaler.scale(torch.ones((), device=images[0].device)) if scaler.is_enabled() else None
        out: dict[str, float] = {}
        accum = len(images)
        for m, x in enumerate(images):
            with self._no_sync(self.rae_model, last=m == accum - 1):
                with self.autocast:
                    rec, lp, rec_loss, gan = generator_losses(
                        self.rae_model, x, self._gen(step, _NOISE, m), lpips=self.lpips if use_lpips else None,
                        perceptual_weight=cfg.perceptual_weight,
                        gan=(lambda r: self.diffaug(r, self._gen(step, _AUG_G, m)), self.disc) if use_gan else None)
                if use_gan:
                    # Read after the forward: under FSDP that is the gathered weight the forward used (before it,
                    # the module holds its shard, which is not in the graph).
                    last_layer = self.rae.decoder.decoder_pred.weight
                    # Outside autocast; fp16: of the scaled losses (unscaled fp16 gradients underflow).
                    d_weight = adaptive_weight(rec_loss, gan, last_layer, cfg.max_d_weight, scale=loss_scale)
                    total = rec_loss + cfg.disc_weight * d_weight * gan
                else:
                    total = rec_loss
                scaler.scale(total / accum).backward()
            _accumulate(out, accum, l1=rec, lpips=lp, loss=total,
                        **({"gan_g": gan, "d_weight": d_weight} if use_gan else {}))
        if self.cfg.train.clip_grad > 0:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(self.rae.decoder.parameters(), self.cfg.train.clip_grad)
            out["grad_norm"] = float(plain(norm))  # FSDP: a DTensor, the global norm
        self._check_finite(opt, scaler, step + 1, out["loss"], out.get("grad_norm", 0.0))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if self.disc is not None:
            self.disc.requires_grad_(True)
        return out

    def disc_step(self, images: list[torch.Tensor], step: int, update: int, opt: torch.optim.Optimizer,
                  scaler) -> dict[str, float]:
        """Hinge loss on DiffAug'd real images vs 8-bit fakes of the updated decoder (eval mode: no noise)."""
        from rae_cli.gan_losses import hinge_d_loss, quantize_fake

        self.rae.eval()
        self.disc.train()
        out: dict[str, float] = {}
        accum = len(images)
        for m, x in enumerate(images):
            with torch.no_grad(), self.autocast:
                recon = self.rae(x)  # the bare module: no gradient, nothing to synchronise
            fake = quantize_fake(recon.float() * 2 - 1)
            fake = self.diffaug(fake, self._gen(step, _AUG_FAKE, update, m))
            real = self.diffaug(x * 2 - 1, self._gen(step, _AUG_REAL, update, m))
            with self._no_sync(self.disc_model, last=m == accum - 1):
                with self.autocast:
                    # One forward for both halves: the heads' norm is per sample, so this equals two calls, and
                    # DDP sees exactly one forward per backward.
                    logits = self.disc_model(torch.cat([fake, real]))
                logits_fake, logits_real = logits.float().chunk(2)
                d_loss = hinge_d_loss(logits_real, logits_fake)
                scaler.scale(d_loss / accum).backward()
            _accumulate(out, accum, d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        self._check_finite(opt, scaler, -1, out["d_loss"], 0.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        self.rae.train()
        return out


def generator_losses(rae_model, x: torch.Tensor, noise: torch.Generator | None, *, lpips, perceptual_weight: float,
                     gan=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(L1, LPIPS, L_rec, L_gan or None) of one micro-batch: the generator step's forward (also run on fake tensors
    by the memory planner). ``gan``: (augment, discriminator) — the fakes are DiffAug'd, not clamped (official)."""
    from rae_cli.gan_losses import vanilla_g_loss

    recon = rae_model(x, generator=noise)  # τ noise on the latents
    rec = (recon.float() - x).abs().mean()  # L1 on the [0, 1] scale
    lp = lpips(x * 2 - 1, recon * 2 - 1).float() if lpips is not None else torch.zeros((), device=x.device)
    rec_loss = rec + perceptual_weight * lp
    g_loss = None
    if gan is not None:
        augment, disc = gan
        g_loss = vanilla_g_loss(disc(augment(recon * 2 - 1)))
    return rec, lp, rec_loss, g_loss


def _accumulate(out: dict[str, float], accum: int, **values: torch.Tensor) -> None:
    for k, v in values.items():
        out[k] = out.get(k, 0.0) + float(v.detach()) / accum


def reduce_log(sums: dict[str, float], count: int, dist) -> dict[str, float]:
    """Averages over the logged steps and over all processes (official: rank 0 only)."""
    from rae_cli.distributed import all_reduce_mean

    keys = sorted(sums)
    if not keys:
        return {}
    t = torch.tensor([sums[k] / count for k in keys], dtype=torch.float64, device=dist.device)
    t = all_reduce_mean(t, dist)
    return dict(zip(keys, t.tolist()))

