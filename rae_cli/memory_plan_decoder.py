"""The memory plan of ``rae train-decoder --dry-run``: every network of stage 1 built on fake tensors from its config.

No weights are read (the encoder, LPIPS VGG16 and DINO trunk are architectures only) and no image folder is needed.
The generator step's saved activations are counted by running the trainer's own loss graph
(:func:`rae_cli.decoder_step.generator_losses`: encoder without grad → noisy latents → decoder → L1 + LPIPS +
DiffAug → discriminator) under :func:`rae_cli.memory_plan.plan_training`, so what autograd keeps through the frozen
loss networks for the decoder's backward (LPIPS and the DINO trunk need the gradient w.r.t. their input) is seen as it
is, with autocast and activation checkpointing. The decoder is the trained model there (weights, gradients, AdamW,
EMA; sharded under FSDP); the frozen networks are replicated weights. Added on top: the discriminator heads
(weights, AdamW moments; their gradients in the discriminator step) and two more phases: the discriminator step
(real + fake micro-batches through the trunk, only the heads' inputs kept) and the reconstruction without grad
that precedes it (its peak of live tensors, measured on fake tensors).

Left out, as in the other plans: the CUDA context and NCCL buffers, allocator fragmentation, the data loader, the
held-out evaluation on rank 0 (a whole EMA copy under FSDP), and the short-lived gradients that the adaptive GAN
weight computes through LPIPS and the discriminator (two ``autograd.grad`` calls to the decoder's last layer).
"""

from __future__ import annotations

import dataclasses

import torch

from rae_cli.memory_plan import (MemoryPlan, TrainSetup, _FakeLiveMeter, _nbytes, _world_size, plan_training,
                                 saved_activation_bytes)


def _parts(cfg):
    """(rae, lpips or None, disc or None) of ``cfg`` on fake tensors, and the fake mode."""
    from rae_cli.build import decoder_arch, image_size_of, resolve_source
    from rae_cli.decoder import ViTDecoder
    from rae_cli.discriminator import DinoDiscriminator
    from rae_cli.encoders import encoder_architecture
    from rae_cli.perceptual import LPIPS, lpips_network
    from rae_cli.rae import RAE

    r = cfg.rae

    def meta_build():
        encoder = encoder_architecture(r.encoder, resolve_source(r.encoder_source), random_init=r.encoder_random_init,
                                       **dict(r.encoder_options))
        info = encoder.info()
        grid = r.encoder_input_size // info.patch_size
        decoder = ViTDecoder(**decoder_arch(r, info.hidden_size, grid * grid))
        rae = RAE(encoder, decoder, input_size=r.encoder_input_size, noise_tau=r.noise_tau, eps=r.eps,
                  encoder_info=info, image_size=image_size_of(r, info.patch_size))
        lpips = LPIPS(lpips_network("meta")) if cfg.loss.perceptual_weight > 0 else None
        disc = DinoDiscriminator(**cfg.disc.arch()) if cfg.loss.gan_enabled else None
        return rae, lpips, disc

    # Built on the meta device (initialisers such as trunc_normal_ read values), then given fake storage.
    with torch.device("meta"):
        parts = meta_build()
    modules = [m for m in parts if m is not None] + ([parts[2].backbone] if parts[2] is not None else [])
    return parts, _fake_storage(modules)


def _fake_storage(modules) -> object:
    """Give the meta-device ``modules``' parameters and buffers fake CPU storage (in place); the fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    made: dict[int, torch.Tensor] = {}  # shared (tied) tensors stay shared
    with mode:
        for module in modules:
            for m in module.modules():
                for table in (m._parameters, m._buffers):
                    for name, t in table.items():
                        if t is None:
                            continue
                        if id(t) not in made:
                            new = torch.empty_like(t, device="cpu")
                            made[id(t)] = (torch.nn.Parameter(new, requires_grad=t.requires_grad)
                                           if isinstance(t, torch.nn.Parameter) else new)
                        table[name] = made[id(t)]
    return mode


def micro_batch(cfg, world: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) as ``train-decoder`` splits the global batch."""
    from rae_cli.decoder_batches import make_plan

    plan = make_plan(cfg, cfg.train.global_batch_size, world)  # one step's worth of images: the split only
    return plan.micro_batch, plan.accum


def plan_train_decoder(cfg, world_size: int | None = None, *, fused_adamw: bool = True) -> MemoryPlan:
    """The plan of ``rae train-decoder`` with ``cfg`` on ``world_size`` processes (default: $WORLD_SIZE or 1).

    ``fused_adamw``: the trainer's fused AdamW on CUDA (no parameter-sized temporary); false for a CPU run."""
    from rae_cli.decoder_step import generator_losses
    from rae_cli.diffaug import DiffAug

    t = cfg.train
    world = _world_size(world_size)
    micro, accum = micro_batch(cfg, world)
    (rae, lpips, disc), mode = _parts(cfg)
    size = rae.image_size
    decoder = rae.decoder
    # DiffAug with every op on (the worst case; its draw reads its switches, which fake tensors cannot give).
    diffaug = DiffAug(cfg.disc.aug_prob, cfg.disc.aug_cutout, cfg.disc.aug_translation)
    if diffaug.prob > 0:
        params = dataclasses.replace(diffaug.draw(micro, size, size), translation=True, color=True,
                                     cutout=min(diffaug.cutout_size(size, size)) > 0)
        augment = lambda x: diffaug.apply(x, params)  # noqa: E731
    else:
        augment = lambda x: x.float()  # noqa: E731
    gan = disc is not None
    if gan:
        disc.requires_grad_(False)  # the generator step's bare, frozen discriminator

    def g_forward(x):
        return generator_losses(rae, x, None, lpips=lpips, perceptual_weight=cfg.loss.perceptual_weight,
                                gan=(augment, disc) if gan else None)

    frozen = {"frozen encoder": [rae.encoder]}
    if lpips is not None:
        frozen["LPIPS VGG16 (frozen)"] = [lpips]
    if gan:
        frozen["discriminator trunk (frozen)"] = [disc.backbone]
    setup = TrainSetup(precision=t.precision, grad_checkpointing=t.grad_checkpointing, parallel=t.parallel,
                       world_size=world, fused_adamw=fused_adamw, grad_accum_steps=accum)
    rae.train()
    images = lambda: (torch.rand(micro, 3, size, size),)  # noqa: E731
    what = (f"train-decoder {cfg.rae.decoder} decoder on {cfg.rae.encoder}, {size}² images, {world} process(es) "
            f"({setup.parallel if world > 1 else 'one process'}), micro-batch {micro} ({accum} per step), "
            f"{t.precision}{', activation checkpointing' if t.grad_checkpointing else ''}"
            f"{', LPIPS' if lpips is not None else ''}{', GAN' if gan else ''}")
    base = plan_training(what, decoder, mode, images, setup, forward=g_forward,
                         extra_frozen=[m for ms in frozen.values() for m in ms], exclude=[disc] if gan else [])
    comps = {}
    for k, v in base.components.items():
        if k == "frozen modules":
            comps.update({name: sum(_nbytes(m.parameters()) + _nbytes(m.buffers()) for m in ms)
                          for name, ms in frozen.items()})
        else:
            comps[k.replace("saved activations", "saved activations (G step)")] = v
    heads = _nbytes(disc.parameters()) if gan else 0
    phases = {"G backward": base.phases["backward"] + 3 * heads,
              "G optimizer step": base.phases["optimizer step"] + 3 * heads}
    static = sum(base.components[k] for k in ("weights (fp32)", "buffers", "AdamW moments", "EMA", "frozen modules"))

    # The reconstruction without grad (the discriminator step's fakes; the encoder's part also opens the G step).
    meter = _FakeLiveMeter()
    rae.eval()
    with mode, torch.no_grad(), meter, torch.autocast("cpu", dtype=_dtype(t.precision) or torch.bfloat16,
                                                      enabled=_dtype(t.precision) is not None):
        rae(*images())
    comps["recon without grad (peak)"] = meter.peak
    phases["recon without grad"] = static + 3 * heads + meter.peak
    if gan:
        disc.requires_grad_(False).heads.requires_grad_(True)
        act_d, _ = saved_activation_bytes(disc, mode, lambda: (torch.rand(2 * micro, 3, size, size),),
                                          precision=t.precision, exclude=[disc.backbone])
        comps["disc heads (weights)"] = heads
        comps["disc heads (AdamW moments)"] = 2 * heads
        comps["disc heads (grads, D step)"] = heads
        comps["saved activations (D, real+fake)"] = act_d
        phases["D step"] = static + 4 * heads + act_d
    notes = list(base.notes)
    if world == 1 and micro >= 128:
        notes.append(f"planned for ONE process (WORLD_SIZE unset): it takes the whole global batch of "
                     f"{t.global_batch_size}; for N GPUs plan with WORLD_SIZE=N (torchrun sets it), or set "
                     f"train.micro_batch_size / train.grad_checkpointing=true / train.precision=bf16")
    if gan:
        notes.append("discriminator heads: DDP (replicated) under both ddp and fsdp; the DINO trunk is frozen")
    notes.append("the GAN and LPIPS terms switch on by epoch (loss.lpips_start, disc_upd_start, disc_start): this "
                 "is the plan once all are on")
    return MemoryPlan(what, comps, phases, notes)


def _dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
