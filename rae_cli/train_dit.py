"""Stage-2 training: a DiT / DiT^DH learns the flow-matching velocity on RAE latents (paper §4; spec §4, §6).

``train_dit(cfg=..., out_dir=...)`` is one code path for 1 or N processes (torchrun; gloo on CPU, NCCL on GPU).
Latents come from a latent cache (``rae cache-latents``, memory-mapped) or are encoded on the fly by the frozen
encoder (outside DDP, under no_grad, fp32 as the official code). The step is the official one with its bugs fixed
(spec §10.1 #4, #5): gradient accumulation with ``no_sync``, one clip and one AdamW step per global batch, an EMA
that starts equal to the model, the LR set from a stateless schedule.

Reproducibility: every random draw is derived from counters with :func:`rae_cli.distributed.generator` — the data
order from (seed, epoch), the mirror coin / label dropout / time of every sample of the *global* batch from
(seed, step), its noise from (seed, step, position in the global batch). Nothing depends on global RNG state, on
the rank or on the number of processes: a resumed run continues bit-identically on CPU, and 1 or N processes
with the same global batch see the same samples. Resume = run the same command again (same ``out_dir``).
The run machinery (processes, run folder and resume policy, precision, NaN guard, checkpoint timing, bad images)
is the shared training core, :mod:`rae_cli.training`; the data is :mod:`rae_cli.dit_batches`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from rae_cli.config import ConfigError
from rae_cli.dit_batches import (SEED_INIT, SEED_NOISE, SEED_ORDER, SEED_STEP, CacheSource, Data,  # noqa: F401
                                 ImageSource, MicroBatches, StepDraws, epoch_order, noise_for, normalize_latents,
                                 step_draws)
from rae_cli.stage2_loading import load_trained_dit  # noqa: F401 (public name here)
from rae_cli.train_dit_config import OptimConfig, Plan, ScheduleConfig, TrainDiTConfig  # noqa: F401 (public names here)
from rae_cli.training.guard import NonFiniteError  # noqa: F401 (public name here)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer, one optimizer step


def build_model(cfg: TrainDiTConfig, latent_shape, num_classes: int) -> torch.nn.Module:
    """The DiT of ``cfg`` with its init drawn from (seed) alone (global RNG state is saved and restored)."""
    from rae_cli.build import build_dit_model
    from rae_cli.distributed import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, SEED_INIT))
        try:
            return build_dit_model(cfg.dit, latent_shape, num_classes)
        except ValueError as e:  # e.g. the width rule of Theorem 1
            raise ConfigError(str(e)) from e


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused when available; the frozen pos-embed and t_embedder.W are out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            log.info("fused AdamW unavailable on %s (%s); using the default implementation", device, e)
    return torch.optim.AdamW(params, **kwargs)


def train_step(*, model_fn, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, micro_batches,
               lr: float, clip_grad: float | None, precision: str, no_sync=None, dist=None,
               step: int | None = None, scaler=None, objective=None) -> tuple[float, float]:
    """One optimizer step over this process's ``micro_batches`` [(z, y, t, noise, drop_ids or None[, r])]: a
    list, or any sized iterable (train-dit passes one that moves each micro-batch to the device as it comes).

    ``objective``: None = flow matching; else a :class:`rae_cli.meanflow.MeanFlowLoss`, called with the micro-batch
    and its r, returning (loss to back-propagate, loss to log), both per sample.

    Each micro-batch loss is its per-sample mean divided by the number of micro-batches, so the accumulated
    gradient is that of the batch mean (DDP averages it over processes). Gradients are all-reduced on the last
    micro-batch only (``no_sync`` on the others), clipped once, and AdamW steps once; then the EMA follows.
    Before stepping, a NaN/Inf loss or gradient norm raises :class:`NonFiniteError` (same decision on every
    rank: the loss is all-reduced and the norm is of all-reduced gradients). With fp16 the ``scaler`` skips steps
    whose scaled gradients overflowed (that is not an error). Returns (mean loss, grad norm).
    """
    from rae_cli import faults
    from rae_cli.distributed import all_reduce_mean
    from rae_cli.flow import training_loss
    from rae_cli.training.guard import check_step
    from rae_cli.training.fsdp import plain
    from rae_cli.training.session import autocast, grad_scaler

    device = next(raw_model.parameters()).device
    scaler = scaler if scaler is not None else grad_scaler(device, precision)
    accum = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for i, (z, y, t, noise, drop, *rest) in enumerate(micro_batches):
        # Forward and backward of all but the last micro-batch run without the DDP gradient all-reduce.
        sync = no_sync is None or i == accum - 1
        with contextlib.nullcontext() if sync else no_sync():
            with autocast(device, precision):
                if objective is None:
                    kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
                    loss = logged = training_loss(model_fn, z, kwargs, t=t, noise=noise).mean() / accum  # fp32
                else:
                    weighted, mse = objective(model_fn, raw_model, z, y, drop, rest[0], t, noise)
                    loss, logged = weighted.mean() / accum, mse.mean() / accum
            scaler.scale(loss).backward()
        loss_sum += logged.detach()
    if faults.nonfinite("loss", step):
        loss_sum = loss_sum * float("nan")
    scaler.unscale_(optimizer)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad is not None else float("inf"))
    values = torch.stack([loss_sum, plain(grad_norm).to(loss_sum)])  # FSDP: a DTensor, the global norm
    if dist is not None:
        values = all_reduce_mean(values, dist)
    loss_value, norm_value = values.tolist()  # the one host sync per step
    try:
        check_step(loss_value, 0.0 if scaler.is_enabled() else norm_value)  # fp16: the scaler handles overflow
    except NonFiniteError:
        optimizer.zero_grad(set_to_none=True)
        raise
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema.update(raw_model)
    return loss_value, norm_value


# ----------------------------------------------------------------------------------------------------------------
# The resolved config and the plan


def _resolved(cfg: TrainDiTConfig, data: Data, stats_path: str | None, shift: float) -> TrainDiTConfig:
    """``cfg`` with the data-derived values written in: what the saved config.yaml holds for ``rae sample``."""
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the data has {data.num_classes} classes")
    if cfg.latent_shape is not None and tuple(cfg.latent_shape) != tuple(data.latent_shape):
        raise ConfigError(f"latent_shape={list(cfg.latent_shape)} but the data's latents are "
                          f"{list(data.latent_shape)}")
    return dataclasses.replace(
        cfg, num_classes=data.num_classes, latent_shape=[int(d) for d in data.latent_shape],
        rae=dataclasses.replace(cfg.rae, stats=stats_path), stats=stats_path or "none",
        flow=dataclasses.replace(cfg.flow, shift=float(shift)),
        cache=str(Path(cfg.cache).resolve()) if cfg.cache else None,
        images=str(Path(cfg.images).resolve()) if cfg.images else None)


def _sources_from_previous_run(cfg: TrainDiTConfig, out: Path) -> TrainDiTConfig:
    """Re-running in the same folder without --cache/--data reuses the data of the previous launch."""
    if cfg.cache or cfg.images or not (out / "config.yaml").is_file():
        return cfg
    from rae_cli.config import read_yaml

    prev = read_yaml(out / "config.yaml")
    return dataclasses.replace(cfg, cache=prev.get("cache"), images=prev.get("images"))


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train_dit(*, cfg: TrainDiTConfig, out_dir: str | Path) -> Path:
    """Train (or resume training) into ``out_dir``; returns the last checkpoint folder.

    Under torchrun every process calls this; rank 0 writes. Stops with :class:`NonFiniteError` on a NaN/Inf
    loss, gradient or weight, keeping every checkpoint saved before it (a non-finite state is never saved).
    """
    from rae_cli.training.session import distributed_session

    with distributed_session(cfg.device, timeout_minutes=cfg.dist_timeout) as dist:
        return _train(cfg, Path(out_dir), dist)


def _load_stats(stats_path: str | None, latent_shape, device):
    """(mean, var) on ``device`` from the resolved statistics file, or (None, None) for raw latents."""
    if stats_path is None:
        return None, None
    from rae_cli.latent_stats import load_stats

    mean, var = (t.to(device) for t in load_stats(stats_path))
    if tuple(mean.shape) != tuple(latent_shape):
        raise ConfigError(f"latent statistics {stats_path} have shape {tuple(mean.shape)}, the latents "
                          f"{tuple(latent_shape)}")
    return mean, var


def _check_same_stats(last, mean, var) -> None:
    """A resumed run must normalise with the statistics it was trained with (the file may have moved)."""
    from rae_cli.stage2_bundle import recorded_hash, stats_hash

    recorded, want = recorded_hash(last.path)
    if recorded and want != stats_hash(mean, var):
        raise ConfigError(f"the latent statistics of this launch differ from the ones {last.path} was trained with "
                          "(sha256 mismatch): the latent cache was rebuilt or stats= changed. Resume with the "
                          "original cache/statistics, or train into a new --out.")


def _train(cfg: TrainDiTConfig, out: Path, dist) -> Path:

    from rae_cli import distributed, faults
    from rae_cli.checkpoint import strict_load
    from rae_cli.config import to_dict
    from rae_cli.dit_batches import (MicroBatchOrder, StepMicroBatches, collate_micro, micro_batch, open_data,
                                     resolve_stats_path, step_inputs)
    from rae_cli.ema import EMA
    from rae_cli.meanflow import training_objective
    from rae_cli.run_dir import MetricsLogger, check_loggers, checkpoint_name, latest_checkpoint
    from rae_cli.stage2_bundle import checkpoint_entries
    from rae_cli.training import bad_images, guard
    from rae_cli.training.clock import CheckpointClock
    from rae_cli.training.fsdp import (full_model_state, full_optimizer_state, full_state, gradient_sync_off,
                                       load_optimizer_state, local_part, shard_like, wrap_fsdp)
    from rae_cli.training.resume import resume_point, write_run_config
    from rae_cli.training.session import grad_scaler, maybe_compile, progress_bar, setup_precision, wrap_ddp

    check_loggers(tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    device = dist.device
    setup_precision(device, tf32=cfg.tf32)
    cfg = _sources_from_previous_run(cfg, out)
    data = open_data(cfg, device)
    shift = cfg.flow.resolved_shift(data.latent_shape)
    stats_path = resolve_stats_path(data.stats_path)
    cfg = _resolved(cfg, data, stats_path, shift)
    plan = Plan.of(cfg, data.num_images)
    world = dist.world_size
    if cfg.global_batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} must be divisible by processes × "
                          f"grad_accum_steps = {world} × {cfg.grad_accum_steps}")
    micro = cfg.global_batch_size // (world * cfg.grad_accum_steps)
    mean, var = _load_stats(stats_path, data.latent_shape, device)
    last = resume_point(out, to_dict(cfg), dist)  # refuses a forbidden config change; None = start afresh
    if last is not None:
        _check_same_stats(last, mean, var)

    model = build_model(cfg, data.latent_shape, data.num_classes).to(device)
    objective = training_objective(cfg, model, data, shift, device)  # None for flow matching (rae_cli.meanflow)
    ema = EMA(model, cfg.ema_decay)  # equal to the model: in sync on every rank from the start
    fsdp = dist.enabled and cfg.parallel == "fsdp"
    if cfg.parallel == "fsdp" and not dist.enabled:
        log.info("parallel=fsdp on one process: nothing to shard, training the whole model as usual")
    state = last.resume_state() if last is not None else None
    if last is not None:  # full weights, loaded before FSDP shards them
        strict_load(model, last.weights("model"), f"model weights {last.path}")
        ema.load_state_dict(last.weights("ema"), f"EMA weights {last.path}")
    if fsdp:  # each block one FSDP unit, then the root; the EMA gets the same layout
        wrap_fsdp(model, model.blocks, device, world, cfg.precision)
        shard_like(ema.module, model)
    optimizer = make_optimizer(model, cfg.optim, device)
    scaler = grad_scaler(device, cfg.precision)
    ckroot = out / "checkpoints"
    start = 0
    if state is not None:
        if fsdp:
            load_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        for group in optimizer.param_groups:  # the config wins over the saved hyperparameters
            group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        start = int(state["step"])
        if int(state.get("global_batch_size", cfg.global_batch_size)) != cfg.global_batch_size:
            log.warning("resuming with a different global batch size: the data order changes from here on")
        if int(last.meta.get("num_images", data.num_images)) != data.num_images:
            log.warning("the data now holds %d images (%s at the checkpoint): resuming on the new list from step %d; "
                        "the data order from here on differs from an uninterrupted run", data.num_images,
                        last.meta.get("num_images"), start)
    write_run_config(out, cfg, dist)
    if dist.is_main:
        n_params = sum(p.numel() for p in ema.module.parameters())  # FSDP: the EMA's DTensors count whole
        log.info("train-dit: %s (%.2fM params) on %s latents, %d images, %d classes, shift %.4f; %d steps/epoch, "
                 "steps %d → %d of %d; %d process(es) (%s) × %d micro-batches of %d", cfg.dit.name, n_params / 1e6,
                 list(data.latent_shape), data.num_images, data.num_classes, shift, plan.steps_per_epoch, start,
                 plan.stop_step, plan.total_steps, world, "fsdp" if fsdp else "ddp" if dist.enabled else "1 process",
                 cfg.grad_accum_steps, micro)

    ddp = wrap_ddp(model, device, sync_buffers=False) if dist.enabled and not fsdp else None
    no_sync = ddp.no_sync if ddp is not None else (lambda: gradient_sync_off(model)) if fsdp else None
    model_fn = maybe_compile(ddp if ddp is not None else model, cfg.compile)
    model.train()

    # One loader item per micro-batch, latents in the cache's dtype: the workers' shared memory and the pinned
    # copies hold micro-batches, not whole step shares in fp32.
    accum = cfg.grad_accum_steps
    batches = MicroBatches(cfg, data.source, data.num_images, plan.steps_per_epoch, dist.rank, world, shift, accum)
    loader = torch.utils.data.DataLoader(batches, sampler=MicroBatchOrder(start, plan.stop_step, accum),
                                         batch_size=None, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", collate_fn=collate_micro)
    items = iter(loader)
    metrics = MetricsLogger(out, start_step=start, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                            wandb=cfg.wandb, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    skipped = bad_images.SkippedLog(out, dist.is_main)
    stats_weights, stats_meta = checkpoint_entries(mean, var, cfg.rae, data.latent_shape, stats_path)
    clock = CheckpointClock(plan.ckpt_every, cfg.ckpt_every_minutes, dist)
    saved_step = last.step if last is not None else None
    pending_bad: list = []
    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()

    def stop(err: Exception, step: int, lr: float) -> NonFiniteError:
        advice = (f"Usual causes: a learning rate too high (lr={lr:g}) or {cfg.precision} overflow — lower optim.lr "
                  "or use precision=fp32")
        return NonFiniteError(guard.stopped_message(err, step=step, ckroot=ckroot, last_good=saved_step,
                                                    advice=advice))

    try:
        with progress_bar("train-dit", dist.is_main) as progress:
            task = progress.add_task("train-dit", total=plan.stop_step, completed=start, info="")
            for step in range(start, plan.stop_step):
                inputs = step_inputs(cfg, step, shift)  # the step's draws, made once for its micro-batches
                batch = StepMicroBatches(items, accum, functools.partial(
                    micro_batch, cfg, step, inputs, data=data, mean=mean, var=var, device=device), pending_bad.extend)
                lr = plan.lr(cfg, step)
                try:
                    loss, gnorm = train_step(model_fn=model_fn, raw_model=model, optimizer=optimizer, ema=ema,
                                             micro_batches=batch, lr=lr, clip_grad=cfg.optim.clip_grad,
                                             precision=cfg.precision, no_sync=no_sync,
                                             dist=dist, step=step + 1, scaler=scaler, objective=objective)
                except NonFiniteError as e:
                    raise stop(e, step + 1, lr) from None
                done = step + 1
                faults.point("train-step", done)
                if faults.nonfinite("weights", done):  # test-only: a blow-up that reaches the weights silently
                    with torch.no_grad():  # FSDP: into this rank's slice (the first non-empty one)
                        next(t for t in map(local_part, model.parameters()) if t.numel()).fill_(float("nan"))
                window_loss += loss
                window_steps += 1
                progress.update(task, completed=done, info=f"loss {loss:.4f} lr {lr:.2e}")
                if done % cfg.log_every == 0 or done == plan.stop_step:
                    skipped.add(bad_images.gather(pending_bad, dist), done)
                    pending_bad = []
                    elapsed = time.perf_counter() - window_t0
                    metrics.log(done, {"epoch": done / plan.steps_per_epoch, "loss": window_loss / window_steps,
                                       "lr": lr, "grad_norm": gnorm,
                                       "imgs_per_s": window_steps * cfg.global_batch_size / max(elapsed, 1e-9),
                                       **({"skipped_images": skipped.count} if skipped.count else {})})
                    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
                if clock.due(done, last=done == plan.stop_step):
                    if fsdp:  # gathered (a collective), whole on rank 0's CPU only
                        weights = {"model": full_model_state(model), "ema": full_state(ema.module, dist.is_main)}
                        opt_state = full_optimizer_state(model, optimizer)
                    else:
                        weights, opt_state = {"model": model.state_dict(), "ema": ema.state_dict()}, None
                    try:
                        guard.check_state(weights, dist)  # a non-finite state is never saved
                    except NonFiniteError as e:
                        raise stop(e, done, lr) from None
                    if dist.is_main:
                        _save(ckroot, done, cfg, plan, weights, opt_state or optimizer.state_dict(), scaler, data,
                              shift, world,
                              stats_weights, stats_meta)
                    saved_step = done
                    distributed.barrier(dist)
    finally:
        metrics.close()
    final = latest_checkpoint(ckroot) if dist.is_main else None
    if dist.is_main:
        log.info("train-dit: done at step %d; checkpoint %s", plan.stop_step, final.path if final else None)
    return final.path if final else ckroot / checkpoint_name(plan.stop_step)


def _save(ckroot: Path, step: int, cfg: TrainDiTConfig, plan: Plan, weights: dict, opt_state: dict, scaler,
          data: Data,
          shift: float, world: int, stats_weights: dict, stats_meta: dict) -> None:
    """Checkpoint ``step`` (rank 0): weights, the latent statistics and RAE identity (the run stands alone),
    the resume state; then the retention policy."""
    from rae_cli.run_dir import apply_retention, save_checkpoint

    save_checkpoint(
        ckroot, step, weights={**weights, **stats_weights},
        resume_state={"step": step, "optimizer": opt_state, "scaler": scaler.state_dict(),
                      "global_batch_size": cfg.global_batch_size, "world_size": world},
        config=cfg,
        meta={"epoch": step / plan.steps_per_epoch, "images_seen": step * cfg.global_batch_size,
              "model": cfg.dit.name, "latent_shape": list(data.latent_shape), "num_classes": data.num_classes,
              "classes": data.classes, "shift": shift, "stats": stats_meta["latent_stats"]["source"],
              "num_images": data.num_images, "total_steps": plan.total_steps, **stats_meta})
    apply_retention(ckroot, keep_last=cfg.keep_last, keep_every=plan.keep_every)
