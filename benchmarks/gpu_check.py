"""One GPU, under 8 minutes: the numbers only a GPU can give, next to the memory planner's estimates, in one table.

- DiT-DH-XL training step (bf16 autocast, compile off and on): images/s, MFU, peak memory vs the plan;
- correctness: the training loss of the compiled model equals eager's on the same batch and weights;
- sampling at DiT-DH-XL (bf16) with CFG and with AutoGuidance (DiT-DH-S guide): images/s, network evaluations;
- the ViT-XL decoder forward (bf16): images/s, peak memory vs the plan.

Random weights throughout (the arithmetic is that of the released models). Without CUDA it says so and exits 0.

    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py --train-batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; other GPUs print MFU as n/a.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def train_rows(batch: int, steps: int) -> list[tuple]:
    import train_dit_throughput as bench

    from rae_cli.config import resolve
    from rae_cli.memory_plan import plan_train_dit
    from rae_cli.train_dit import TrainDiTConfig

    cfg = resolve(TrainDiTConfig, preset="dit-dh-xl_dinov2-b_in256",
                  overrides=["precision=bf16", f"global_batch_size={batch}", "latent_shape=[768,16,16]"])
    planned = plan_train_dit(cfg, world_size=1).peak
    peak = peak_tflops(torch.cuda.get_device_name())
    rows = []
    for compile_ in (False, True):
        torch.cuda.empty_cache()
        res = bench.main(["--preset", "dit-dh-xl_dinov2-b_in256", "--batch-size", str(batch), "--precision", "bf16",
                          "--steps", str(steps), "--warmup", "3" if compile_ else "1",
                          *(["compile=true"] if compile_ else [])])
        mem = torch.cuda.max_memory_allocated()
        mfu = f"{100 * res['gflops'] / 1e3 / peak:.0f}%" if peak else "n/a"
        rows.append((f"train DiT-DH-XL bf16 b{batch}" + (" compile" if compile_ else ""),
                     f"{res['images_per_s']:.1f} img/s", f"MFU {mfu}", gib(mem), gib(planned)))
    return rows


def compile_matches_eager() -> tuple:
    """Same weights, same batch: the compiled training loss (fp32, TF32 off) equals eager's within 1e-4."""
    from rae_cli.build import build_dit_model
    from rae_cli.config import resolve
    from rae_cli.flow import training_loss
    from rae_cli.schema import DiTConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_dit_model(resolve(DiTConfig, preset="dit-dh-s"), (768, 16, 16), 1000).cuda().train()
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(8, 768, 16, 16, device="cuda", generator=g)
    noise = torch.randn(8, 768, 16, 16, device="cuda", generator=g)
    t = torch.rand(8, device="cuda", generator=g)
    y = torch.randint(0, 1000, (8,), device="cuda", generator=g)
    eager = training_loss(model, z, {"y": y}, t=t, noise=noise).mean().item()
    compiled = training_loss(torch.compile(model), z, {"y": y}, t=t, noise=noise).mean().item()
    rel = abs(compiled - eager) / abs(eager)
    torch.backends.cuda.matmul.allow_tf32 = True
    return ("compile vs eager loss (DiT-DH-S fp32)", f"{eager:.6f} vs {compiled:.6f}",
            "OK" if rel < 1e-4 else f"MISMATCH rel {rel:.1e}", "", "")


def sample_rows(images: int, batch: int) -> list[tuple]:
    import dataclasses

    import sample_throughput as bench

    from rae_cli.memory_plan import plan_sample
    from rae_cli.sample import resolve_sample_config

    rows = []
    for preset, label in (("dit-dh-xl_in256", "CFG 1.5"), ("dit-dh-xl_in256_ag", "AutoGuidance")):
        _, cfg = resolve_sample_config(preset, ["dit_random_init=true", "latent_shape=[768,16,16]",
                                                "num_classes=1000", f"batch_size={batch}", "dtype=bf16",
                                                "device=cuda"])
        if label.startswith("CFG"):
            cfg = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, method="cfg", scale=1.5))
        planned = plan_sample(cfg).peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res = bench.measure(cfg, torch.device("cuda"), images, random_init=True, decode=False)
        nfe = res["network_evaluations_per_image"]
        rows.append((f"sample DiT-DH-XL bf16 b{batch} {label}", f"{res['images_per_second']:.1f} img/s",
                     f"NFE {nfe['main']:.0f}+{nfe['guide']:.0f}", gib(torch.cuda.max_memory_allocated()),
                     gib(planned)))
    return rows


def decoder_row(batch: int, repeats: int) -> tuple:
    from rae_cli.decoder import decoder_from_size
    from rae_cli.memory_plan import build_fake, plan_sampling

    def make():
        return decoder_from_size("ViT-XL", latent_dim=768, patch_size=16, num_patches=256)

    model, mode = build_fake(make)
    planned = plan_sampling("decoder", model, mode, lambda: (torch.randn(batch, 768, 16, 16),)).peak
    dec = make().cuda().eval()
    z = torch.randn(batch, 768, 16, 16, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        dec(z)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dec(z)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    return (f"decoder ViT-XL forward bf16 b{batch}", f"{batch / seconds:.1f} img/s", "",
            gib(torch.cuda.max_memory_allocated()), gib(planned))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--sample-images", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--decoder-batch", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to measure (run it on a machine with an NVIDIA GPU)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows: list[tuple] = []
    parts = {"train": lambda: train_rows(args.train_batch, args.train_steps),
             "compile check": lambda: [compile_matches_eager()],
             "sample": lambda: sample_rows(args.sample_images, args.sample_batch),
             "decoder": lambda: [decoder_row(args.decoder_batch, 10)]}
    for name, part in parts.items():
        try:
            rows.extend(part())
        except Exception as e:  # one failing part must not hide the others' figures
            rows.append((name, "FAILED", f"{type(e).__name__}: {e}"[:80], "", ""))
    header = ("check", "speed", "detail", "peak memory", "planned")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
