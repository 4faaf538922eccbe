"""Stage-2 training throughput: images/s, peak memory and achieved GFLOP/s next to a same-run matmul reference.

Runs the real optimizer step of ``rae train-dit`` (forward, backward, clip, AdamW, EMA) on synthetic latents, so
data loading is excluded. FLOPs are counted once with ``torch.utils.flop_counter`` (matmuls, convolutions and
attention of the forward + backward pass); the reference is a square matmul in the training dtype.

    python benchmarks/train_dit_throughput.py --preset dit-dh-s_dinov2-b_in256 --batch-size 8 --precision fp32
    python benchmarks/train_dit_throughput.py --preset tiny --latent-shape 32,4,4 --batch-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs), best of ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dit-dh-s_dinov2-b_in256", help="train-dit preset (model, optimizer, ...)")
    p.add_argument("--batch-size", type=int, default=8, help="images per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="override the preset's precision")
    p.add_argument("--latent-shape", default=None, help="C,h,w (default: the preset's latent_shape or 768,16,16)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--matmul-size", type=int, default=None, help="reference matmul size (default 2048 CPU, 8192 GPU)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides of the preset")
    args = p.parse_args(argv)

    from rae_cli.build import device_of
    from rae_cli.config import resolve
    from rae_cli.ema import EMA
    from rae_cli.flow import sample_time
    from rae_cli.train_dit import TrainDiTConfig, build_model, make_optimizer, train_step

    overrides = list(args.overrides) + ([f"precision={args.precision}"] if args.precision else [])
    cfg = resolve(TrainDiTConfig, preset=args.preset, overrides=overrides)
    device = device_of(args.device)
    if args.latent_shape:
        shape = tuple(int(v) for v in args.latent_shape.split(","))
    else:
        shape = tuple(cfg.latent_shape) if cfg.latent_shape else (768, 16, 16)
    shift = cfg.flow.resolved_shift(shape)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    if device.type == "cpu":  # as `rae train-dit` runs on the CPU (rae_cli/cpu_malloc.py; RAE_CPU_MALLOC=system: off)
        from rae_cli.cpu_malloc import keep_freed_memory

        keep_freed_memory()

    model = build_model(cfg, shape, args.num_classes).to(device).train()
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg.optim, device)
    model_fn = torch.compile(model) if cfg.compile else model
    n_params = sum(q.numel() for q in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    B = args.batch_size

    def batch():
        z = torch.randn(B, *shape, generator=g).to(device)
        noise = torch.randn(B, *shape, generator=g).to(device)
        y = torch.randint(0, args.num_classes, (B,), generator=g).to(device)
        t = sample_time(B, cfg.flow.time_dist, mu=cfg.flow.logit_mu, sigma=cfg.flow.logit_sigma, shift=shift,
                        generator=g).to(device)
        return [(z, y, t, noise, None)]

    def step():
        return train_step(model_fn=model_fn, raw_model=model, optimizer=opt, ema=ema, micro_batches=batch(),
                          lr=cfg.optim.lr, clip_grad=cfg.optim.clip_grad, precision=cfg.precision)

    # FLOPs of one forward + backward (the optimizer and EMA are memory-bound and not counted).
    from torch.utils.flop_counter import FlopCounterMode

    from rae_cli.flow import training_loss

    z, y, t, noise, _ = batch()[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        training_loss(model, z, {"y": y}, t=t, noise=noise).mean().backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    ref = matmul_gflops(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048))
    achieved = flops / mean / 1e9
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"{cfg.dit.name} ({n_params / 1e6:.2f}M params) on latents {list(shape)}, batch {B}, {cfg.precision}, "
        f"{where}, torch {torch.__version__}",
        f"  step time      {mean * 1e3:.1f} ms (mean of {len(times)}; min {min(times) * 1e3:.1f} ms)",
        f"  throughput     {B / mean:.2f} images/s",
        f"  peak memory    {peak}",
        f"  model FLOPs    {flops / 1e9:.1f} GFLOP per step (forward + backward)",
        f"  achieved       {achieved:.1f} GFLOP/s  vs  matmul reference {ref:.1f} GFLOP/s "
        f"({100 * achieved / ref:.0f}%)",
    ]
    print("\n".join(lines))
    return {"images_per_s": B / mean, "step_s": mean, "gflops": achieved, "matmul_gflops": ref, "lines": lines}


if __name__ == "__main__":
    main(sys.argv[1:])
