"""Stage-1 training (paper §3, spec §2): the ViT decoder learns to invert a frozen encoder, with L1 + LPIPS + GAN.

One iteration (spec §2.3): a generator step on the noisy latents (τ), then a discriminator step on 8-bit fakes from
the updated decoder in eval mode. Differences from the official trainer (spec §10.1), each on purpose: the
discriminator heads are trained through their own DDP wrapper, so their gradients are all-reduced (the official code
trains one unsynchronised discriminator per GPU); the generator step calls the bare discriminator with its parameters
frozen, so it neither accumulates nor all-reduces D gradients; gradient accumulation uses ``no_sync``; fp16 keeps
one GradScaler per optimizer; the EMA covers the decoder only; checkpoints hold the decoder, its EMA and the
discriminator heads (the frozen encoder is referenced by the config, never saved); every random draw is derived from
(seed, rank, step), so a resumed run continues bit-identically (on CPU).

The run machinery (processes, run folder and resume policy, precision, NaN guard, checkpoint timing, bad images,
metrics) is the shared training core :mod:`rae_cli.training`; the G/D step is :mod:`rae_cli.decoder_step`, the
evaluation and export :mod:`rae_cli.decoder_export`, the settings :mod:`rae_cli.train_decoder_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rae_cli import faults
from rae_cli.config import ConfigError
from rae_cli.decoder_batches import (CropDataset, Plan, StepSampler, collate, group_steps,  # noqa: F401
                                     make_plan, split_holdout, step_items)
from rae_cli.decoder_export import EXPORT_DIR, RUN_KIND, evaluate, export_trained_decoder  # noqa: F401 (public)
from rae_cli.train_decoder_config import (DecoderDataConfig, DecoderLossConfig, DecoderTrainConfig,  # noqa: F401
                                          DiscConfig, TrainDecoderConfig)
from rae_cli.training.guard import NonFiniteError  # noqa: F401 (raised by the loop)
from rae_cli.training.session import PRECISIONS  # noqa: F401 (public name here)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Building the pieces


def build_disc(cfg: DiscConfig, seed: int):
    from rae_cli.discriminator import build_dino_discriminator

    torch.manual_seed(seed)  # head init; identical on every rank (DDP would broadcast rank 0's anyway)
    return build_dino_discriminator(cfg.weights, random_init=cfg.random_init, **cfg.arch())


def _adamw(params, lr: float, betas, weight_decay: float, eps: float, device: torch.device):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps,
                             fused=device.type == "cuda")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _lr(step: int, plan: Plan, cfg: DecoderTrainConfig, base: float, final: float) -> float:
    from rae_cli.lr_schedule import lr_at

    return lr_at(step, kind=cfg.schedule, base_lr=base, final_lr=final,
                 warmup=round(cfg.warmup_epochs * plan.steps_per_epoch), warmup_from_zero=cfg.warmup_from_zero,
                 total=plan.total_steps, decay_end=plan.total_steps)



# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What ``train_decoder`` leaves behind (the modules are this process's copies; under ``train.parallel=fsdp``
    the decoder and its EMA hold this process's DTensor shards — read the checkpoint for whole weights)."""

    out_dir: Path
    step: int
    plan: Plan
    decoder: torch.nn.Module
    ema_decoder: torch.nn.Module
    disc: torch.nn.Module
    last_eval: dict = dataclasses.field(default_factory=dict)



def train_decoder(*, cfg: TrainDecoderConfig, out_dir: str | Path) -> TrainResult:
    """Train ``cfg.rae``'s decoder on ``cfg.data.path``; write checkpoints, metrics and the export into ``out_dir``.

    Runs on 1 process or under torchrun (DDP). Re-running the same call resumes from the newest checkpoint and
    continues bit-identically (on CPU; GPU kernels may differ in the last bits).
    """
    from rae_cli.training.session import distributed_session

    if not cfg.data.path:
        raise ConfigError("data.path is not set: give the training image folder")
    with distributed_session(cfg.train.device, timeout_minutes=cfg.train.dist_timeout) as dist:
        return _train(cfg, Path(out_dir), dist)


def _train(cfg: TrainDecoderConfig, out: Path, dist) -> TrainResult:
    from rae_cli import distributed, run_dir
    from rae_cli.build import build_rae
    from rae_cli.config import to_dict
    from rae_cli.data import list_images
    from rae_cli.decoder_step import StepContext, reduce_log
    from rae_cli.diffaug import DiffAug
    from rae_cli.ema import EMA
    from rae_cli.gan_losses import GanSchedule
    from rae_cli.perceptual import build_lpips
    from rae_cli.training import bad_images, guard
    from rae_cli.training.clock import CheckpointClock
    from rae_cli.training.fsdp import (full_model_state, full_optimizer_state, full_state, load_optimizer_state,
                                       shard_like, wrap_fsdp)
    from rae_cli.training.resume import resume_point, write_run_config
    from rae_cli.training.session import (autocast, grad_scaler, maybe_compile, progress_bar, setup_precision,
                                          wrap_ddp)

    run_dir.check_loggers(tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb)
    device = dist.device
    setup_precision(device, tf32=cfg.train.tf32)
    ckpt_root = out / "checkpoints"
    files = list_images(cfg.data.path)
    train_files, held_files = split_holdout(files, cfg.data.holdout, cfg.train.seed)
    plan = make_plan(cfg, len(train_files), dist.world_size)
    last = resume_point(out, to_dict(cfg), dist)  # refuses a forbidden config change; None = start afresh
    write_run_config(out, cfg, dist, extra={"kind": RUN_KIND})

    # -- models (the loss networks first: missing weights fail before the encoder is loaded) --------------------
    lpips = None
    if cfg.loss.perceptual_weight > 0:  # no VGG weights needed when LPIPS is switched off
        torch.manual_seed(cfg.train.seed)  # a random-init LPIPS trunk (tests) is the same on every rank
        lpips = build_lpips(cfg.loss.lpips_weights, random_init=cfg.loss.lpips_random_init).to(device)
    gan = cfg.loss.gan_enabled
    disc = build_disc(cfg.disc, cfg.train.seed).to(device) if gan else None
    rae = build_rae(cfg.rae, device=device)
    rae.decoder.grad_checkpointing = cfg.train.grad_checkpointing
    decoder = rae.decoder
    if cfg.rae.encoder_random_init or (gan and cfg.disc.random_init) or cfg.loss.lpips_random_init:
        log.warning("TEST-ONLY random-init networks in use (encoder=%s, discriminator backbone=%s, LPIPS VGG=%s): "
                    "this run does not train a usable decoder", cfg.rae.encoder_random_init, cfg.disc.random_init,
                    cfg.loss.lpips_random_init)
    ema = EMA(decoder, cfg.train.ema_decay)
    opt_d = _adamw(list(disc.parameters()), cfg.disc.lr, cfg.disc.betas, cfg.disc.weight_decay,
                   cfg.train.adam_eps, device) if gan else None
    scaler_g = grad_scaler(device, cfg.train.precision)  # one per optimizer (official: shared, §10.1 #9)
    scaler_d = grad_scaler(device, cfg.train.precision)

    start, state = 0, None
    if last is not None:  # full weights, loaded before FSDP shards the decoder
        start, state = _load_checkpoint(last, plan, decoder=decoder, ema=ema, disc=disc, opt_d=opt_d,
                                        scaler_g=scaler_g, scaler_d=scaler_d)
        if dist.is_main:
            log.info("resuming from %s (step %d of %d)", last.path, start, plan.total_steps)
    # FSDP shards the decoder only (each layer, then the rest; the EMA the same way): the encoder is frozen and
    # replicated, the discriminator heads are small and stay DDP. Rank 0 evaluates a whole copy of the EMA.
    fsdp = dist.enabled and cfg.train.parallel == "fsdp"
    eval_decoder = copy.deepcopy(ema.module) if fsdp and held_files and dist.is_main else ema.module
    if fsdp:
        wrap_fsdp(decoder, decoder.decoder_layers, device, dist.world_size, cfg.train.precision)
        shard_like(ema.module, decoder)
    elif cfg.train.parallel == "fsdp":
        log.info("train.parallel=fsdp on one process: nothing to shard, training the whole decoder as usual")
    opt_g = _adamw([p for p in decoder.parameters() if p.requires_grad], cfg.train.lr, cfg.train.betas,
                   cfg.train.weight_decay, cfg.train.adam_eps, device)
    if state is not None:
        if fsdp:
            load_optimizer_state(decoder, opt_g, state["opt_g"])
        else:
            opt_g.load_state_dict(state["opt_g"])

    # -- DDP: the decoder (through the RAE; FSDP: sharded above) and the discriminator heads each get a wrapper ---
    rae_model, disc_model = rae, disc
    if dist.enabled and not fsdp:
        rae_model = wrap_ddp(rae, device, sync_buffers=False)  # only the decoder has trainable params; no buffer changes
    if dist.enabled and gan:  # D gradients are all-reduced (official: not, §10.1 #8)
        disc_model = wrap_ddp(disc, device, sync_buffers=True)
    rae_model = maybe_compile(rae_model, cfg.train.compile)
    disc_model = maybe_compile(disc_model, cfg.train.compile) if gan else None

    schedule = GanSchedule(cfg.loss.lpips_start, cfg.loss.disc_upd_start, cfg.loss.disc_start, plan.steps_per_epoch)
    diffaug = DiffAug(cfg.disc.aug_prob, cfg.disc.aug_cutout, cfg.disc.aug_translation)
    ctx = StepContext(cfg=cfg, plan=plan, dist=dist, rae=rae, rae_model=rae_model, disc=disc, disc_model=disc_model,
                      lpips=lpips, diffaug=diffaug, schedule=schedule,
                      autocast=autocast(device, cfg.train.precision))

    held = ema_rae = None
    pending_bad: list = []
    if held_files and dist.is_main:
        from rae_cli.data import load_batch
        from rae_cli.rae import RAE

        held, _, bad_held = load_batch(held_files, rae.image_size, crop="adm", skip_bad=True)
        pending_bad.extend((str(f), why) for f, why in bad_held)  # logged with the first metrics line
        # The EMA decoder behind the same (shared) frozen encoder and statistics, in eval mode: no latent noise.
        ema_rae = RAE(rae.encoder, eval_decoder, input_size=rae.input_size, noise_tau=0.0, latent_mean=rae.latent_mean,
                      latent_var=rae.latent_var, eps=rae.eps).to(device).eval()

    if dist.is_main:
        log.info("train-decoder: %d training images (%d held out), %d steps/epoch, %d steps, global batch %d = "
                 "%d processes × %d micro-batch × %d accumulation, %s, decoder %.1fM params",
                 plan.num_train, len(held_files), plan.steps_per_epoch, plan.total_steps,
                 cfg.train.global_batch_size, dist.world_size, plan.micro_batch, plan.accum, cfg.train.precision,
                 sum(p.numel() for p in decoder.parameters() if p.requires_grad) / 1e6)

    end = plan.total_steps if cfg.train.stop_after is None else min(plan.total_steps, max(start, cfg.train.stop_after))
    loader = torch.utils.data.DataLoader(
        CropDataset(train_files, rae.image_size, cfg.data.resize_scale, cfg.train.seed),
        batch_sampler=StepSampler(plan, start, end, cfg.train.seed, dist.rank),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", collate_fn=collate,
        persistent_workers=False)
    metrics = run_dir.MetricsLogger(out, start_step=start, enabled=dist.is_main, tensorboard=cfg.train.tensorboard,
                                    wandb=cfg.train.wandb, wandb_project=cfg.train.wandb_project, config=to_dict(cfg))
    skipped = bad_images.SkippedLog(out, dist.is_main)
    clock = CheckpointClock(cfg.train.ckpt_every, cfg.train.ckpt_every_minutes, dist)
    saved_step = last.step if last is not None else None
    last_eval: dict = {}
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    step = start

    def stop(err: Exception, at: int) -> NonFiniteError:
        advice = (f"Usual causes: a learning rate too high (train.lr={cfg.train.lr:g}, disc.lr={cfg.disc.lr:g}) or "
                  f"{cfg.train.precision} overflow — lower the learning rates or use train.precision=fp32")
        return NonFiniteError(guard.stopped_message(err, step=at, ckroot=ckpt_root, last_good=saved_step,
                                                    advice=advice))

    try:
        with progress_bar("train-decoder", dist.is_main, info=False) as progress:
            task = progress.add_task("train-decoder", total=plan.total_steps, completed=start)
            for micro_batches in group_steps(loader, plan.accum):
                images = [x.to(device, non_blocking=True) for x, _ in micro_batches]
                pending_bad.extend(s for _, bad in micro_batches for s in bad)
                rae.train()
                lr_g = _lr(step, plan, cfg.train, cfg.train.lr, cfg.train.final_lr)
                _set_lr(opt_g, lr_g)
                try:
                    stats = ctx.generator_step(images, step, opt_g, scaler_g)
                    ema.update(decoder)
                    if gan and schedule.update_disc(step):
                        for u in range(cfg.loss.disc_updates):
                            d_step = (step - schedule.disc_update_start_step) * cfg.loss.disc_updates + u
                            # The disc schedule advances only while D trains (official behaviour, spec §2.3).
                            _set_lr(opt_d, _lr(d_step, plan, cfg.train, cfg.disc.lr, cfg.disc.final_lr))
                            stats.update(ctx.disc_step(images, step, u, opt_d, scaler_d))
                        stats["lr_d"] = opt_d.param_groups[0]["lr"]
                except NonFiniteError as e:
                    raise stop(e, step + 1) from None
                stats["lr"] = lr_g
                step += 1
                faults.point("train-step", step)
                if faults.nonfinite("weights", step):  # test-only: a blow-up that reaches the weights silently
                    with torch.no_grad():
                        decoder.decoder_pred.weight.fill_(float("nan"))
                progress.advance(task)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1

                if step % cfg.train.log_every == 0 or step == end:
                    row = reduce_log(sums, count, dist)
                    skipped.add(bad_images.gather(pending_bad, dist), step)
                    pending_bad = []
                    row.update(epoch=step / plan.steps_per_epoch,
                               images_per_s=count * cfg.train.global_batch_size / max(time.time() - t0, 1e-9),
                               **({"skipped_images": skipped.count} if skipped.count else {}))
                    metrics.log(step, row)
                    if dist.is_main:
                        log.info("step %d/%d %s", step, plan.total_steps,
                                 "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
                    sums, count, t0 = {}, 0, time.time()
                if held_files and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                   or step == plan.total_steps):
                    if fsdp:  # gathered by every rank; rank 0's whole copy evaluates
                        whole = full_state(ema.module, dist.is_main)
                        if dist.is_main:
                            eval_decoder.load_state_dict(whole)
                if held is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                         or step == plan.total_steps):
                    last_eval = evaluate(ema_rae, held, out / "samples" / f"{run_dir.checkpoint_name(step)}.png")
                    metrics.log(step, {f"eval_{k}": v for k, v in last_eval.items()})
                    log.info("step %d eval (EMA decoder, held-out): PSNR %.2f dB  SSIM %.4f", step,
                             last_eval["psnr"], last_eval["ssim"])
                if clock.due(step, last=step == end):
                    if fsdp:  # gathered (a collective), whole on rank 0's CPU only
                        weights = {"decoder": full_model_state(decoder), "ema": full_state(ema.module, dist.is_main)}
                        opt_g_state = full_optimizer_state(decoder, opt_g)
                    else:
                        weights = {"decoder": decoder.state_dict(), "ema": ema.state_dict()}
                        opt_g_state = opt_g.state_dict()
                    weights.update({"disc": disc.state_dict()} if disc is not None else {})
                    try:
                        guard.check_state(weights, dist)  # a non-finite state is never saved
                    except NonFiniteError as e:
                        raise stop(e, step) from None
                    _save_checkpoint(cfg, ckpt_root, step, plan, dist, weights, decoder=decoder, opt_g=opt_g_state,
                                     opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d)
                    saved_step = step
    finally:
        metrics.close()

    if step == plan.total_steps and dist.is_main:
        export_trained_decoder(run_dir.latest_checkpoint(ckpt_root).path, out / EXPORT_DIR)
    distributed.barrier(dist)
    return TrainResult(out, step, plan, decoder, ema.module, disc, last_eval)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(cfg, root: Path, step: int, plan: Plan, dist, weights: dict, *, decoder, opt_g, opt_d,
                     scaler_g, scaler_d) -> None:
    from rae_cli import distributed, run_dir

    if dist.is_main:
        run_dir.save_checkpoint(
            root, step, weights=weights,
            resume_state={"step": step, "opt_g": opt_g, "scaler_g": scaler_g.state_dict(),
                          "scaler_d": scaler_d.state_dict(),
                          **({"opt_d": opt_d.state_dict()} if opt_d is not None else {})},
            config=cfg,
            meta={"kind": RUN_KIND, "num_train": plan.num_train, "steps_per_epoch": plan.steps_per_epoch,
                  "total_steps": plan.total_steps, "world_size": dist.world_size, "decoder_arch": decoder.arch(),
                  "encoder": "not saved: referenced by config.yaml (rae.encoder, rae.encoder_source)"})
        run_dir.apply_retention(root, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
    distributed.barrier(dist)


def _load_checkpoint(ckpt, plan: Plan, *, decoder, ema, disc, opt_d, scaler_g, scaler_d) -> tuple[int, dict]:
    """Load the weights, the discriminator's optimizer and the scalers; return (step, resume state) — the
    decoder's optimizer state is loaded by the caller, once the decoder is (maybe) sharded."""
    from rae_cli.checkpoint import CheckpointError, strict_load

    meta = ckpt.meta
    if meta.get("kind") != RUN_KIND:
        raise CheckpointError(f"{ckpt.path} is not a train-decoder checkpoint (kind {meta.get('kind')!r})")
    if meta.get("num_train") != plan.num_train:
        log.warning("the image folder now holds %d training images (%s at %s): resuming on the new file list from "
                    "step %d with %d steps in all (was %s); the data order from here on differs from an "
                    "uninterrupted run", plan.num_train, meta.get("num_train"), ckpt.path.name, ckpt.step,
                    plan.total_steps, meta.get("total_steps"))
    strict_load(decoder, ckpt.weights("decoder"), f"{ckpt.path}/decoder.safetensors")
    ema.load_state_dict(ckpt.weights("ema"), f"{ckpt.path}/ema.safetensors")
    state = ckpt.resume_state()
    if disc is not None:
        strict_load(disc, ckpt.weights("disc"), f"{ckpt.path}/disc.safetensors")
        opt_d.load_state_dict(state["opt_d"])
    scaler_g.load_state_dict(state["scaler_g"])
    scaler_d.load_state_dict(state["scaler_d"])
    return int(state["step"]), state
