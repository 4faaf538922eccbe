"""Speed at equal math: ours next to the official code, each in its own process (issue #11 item 7).

Three parts, each at the sizes of the issue: the DiT-DH-S training step at batch 8 on 768×16×16 latents (forward,
backward, clip, fused AdamW, EMA), one CFG-guided Euler step of DiT-DH-S at batch 4 (scale 1.5, every sample
inside the interval), and the ViT-B decoder forward at batch 4 (256 tokens). Both implementations get the same
weights and inputs. Each (part, implementation) runs in a fresh process — ``--warmup`` untimed repetitions,
then ``--reps`` timed ones — and the processes alternate (ours, official, ours, official, ... for ``--rounds``
rounds) so that a busy machine slows both alike; the medians over all repetitions are compared. Separate processes
matter on the CPU: two models in one process share glibc's heap, and which one re-faults freed pages depends on the
other's allocations (interleaved in one process, the same training step measured 0.96× that isolated measured ≈ 1.0×).
A square matmul in the same run gives the reference GFLOP/s (figures of different runs compare only through it).
Each process also reports its minor page faults per repetition and its peak memory: CUDA max allocated on a GPU,
else how far the repetitions raise the peak RSS above the peak once the models are built.

``--malloc`` (CPU only): ``as-run`` (default) runs each side as its own program runs — ours with freed memory kept
for reuse as ``rae`` does on the CPU (rae_cli/cpu_malloc.py), the official code with glibc's defaults; ``system``
gives both glibc's defaults, ``keep`` gives both the kept memory (equal allocators: the code alone compared).

The official code is not part of this package: pass its ``src`` folder (github.com/bytetriper/RAE at a4d18c4; it
imports einops, regex, timm and transformers). Without it only ours is timed.

    python benchmarks/speed_at_equal_math.py --official-src /path/to/RAE/src --threads 2 --reps 3 --rounds 2
    python benchmarks/speed_at_equal_math.py --official-src RAE/src --parts decoder,cfg --malloc keep
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

PARTS = ("train", "cfg", "decoder")
DDT_S = dict(input_size=16, patch_size=1, in_channels=768, hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16],
             mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000)
LATENT = (768, 16, 16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# The three parts: build(impl) → a zero-argument callable that runs one repetition.


def _dit(impl: str, device: torch.device):
    """DiT-DH-S, ours or official, with the same (seeded) weights."""
    from rae_cli.dit_models import DiTDH

    torch.manual_seed(0)
    ours = DiTDH(**DDT_S)
    if impl == "ours":
        return ours.to(device)
    from stage2.models.DDT import DiTwDDTHead  # the official model (--official-src on sys.path)

    official = DiTwDDTHead(**DDT_S)
    official.load_state_dict(ours.state_dict(), strict=True)
    return official.to(device)


def _inputs(batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, *LATENT, generator=g)
    noise = torch.randn(batch, *LATENT, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    t = torch.rand(batch, generator=g)
    return z.to(device), noise.to(device), y.to(device), t.to(device)


def build_train(impl: str, device: torch.device, batch: int = 8):
    from rae_cli.ema import EMA
    from rae_cli.train_dit import make_optimizer, train_step
    from rae_cli.train_dit_config import OptimConfig

    model = _dit(impl, device).train()
    z, noise, y, t = _inputs(batch, device)
    cfg = OptimConfig()
    if impl == "ours":
        ema, opt = EMA(model, 0.9995), make_optimizer(model, cfg, device)

        def step():
            train_step(model_fn=model, raw_model=model, optimizer=opt, ema=ema, micro_batches=[(z, y, t, noise, None)],
                       lr=cfg.lr, clip_grad=cfg.clip_grad, precision="fp32")
        return step

    # The official loop (src/train.py): transport loss on x_t = t·x1 + (1 − t)·x0 with x1 = data, target x1 − x0,
    # backward, clip_grad_norm_, fused AdamW, update_ema over named parameters, loss.item() for logging.
    import copy

    from utils.train_utils import update_ema

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
                            eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)
    x0, x1, s = noise, z, 1 - t  # official time runs the other way (t = 1 is data)

    def step():
        xt = s.view(-1, 1, 1, 1) * x1 + (1 - s.view(-1, 1, 1, 1)) * x0
        loss = ((model(xt, s, y) - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        update_ema(ema, model, 0.9995)
        loss.item()
    return step


def build_cfg(impl: str, device: torch.device, batch: int = 4, scale: float = 1.5):
    model = _dit(impl, device).eval()
    z, _, y, _ = _inputs(batch, device)
    t_cur, t_next = torch.tensor(0.9), torch.tensor(0.88)
    if impl == "ours":
        from rae_cli.guidance import cfg

        model_fn = cfg(model, y.to(device), scale)

        @torch.no_grad()
        def step():
            t = t_cur.to(device).expand(batch).clone()
            return z + (t_next - t_cur).to(device) * model_fn(z, t)
        return step

    # Official sampling (src/sample.py + transport): a doubled state [z; z] with labels [y; null], the model's
    # forward_with_cfg, an Euler step on the doubled state.
    x2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 1000)])

    @torch.no_grad()
    def step():
        t = torch.ones(2 * batch, device=device) * t_cur.to(device)
        return x2 + (t_next - t_cur).to(device) * model.forward_with_cfg(x2, t, y2, scale, (0.0, 1.0))
    return step


def build_decoder(impl: str, device: torch.device, batch: int = 4):
    from rae_cli.decoder import decoder_from_size

    torch.manual_seed(0)
    ours = decoder_from_size("ViT-B", latent_dim=768, patch_size=16, num_patches=256).eval()
    tokens = torch.randn(batch, 256, 768, generator=torch.Generator().manual_seed(2)).to(device)
    if impl == "ours":
        model = ours.to(device)

        @torch.no_grad()
        def step():
            return model(tokens)
        return step

    from stage1.decoders import GeneralDecoder
    from transformers import ViTMAEConfig

    from rae_cli.decoder import DECODER_SIZES

    hidden, depth, heads, mlp = DECODER_SIZES["ViT-B"]
    config = ViTMAEConfig(hidden_size=768, patch_size=16, image_size=256, decoder_hidden_size=hidden,
                          decoder_num_hidden_layers=depth, decoder_num_attention_heads=heads,
                          decoder_intermediate_size=mlp, layer_norm_eps=1e-12, qkv_bias=True, num_channels=3)
    official = GeneralDecoder(config, num_patches=256).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    official.to(device)

    @torch.no_grad()
    def step():
        return official(tokens).logits
    return step


BUILDERS = {"train": build_train, "cfg": build_cfg, "decoder": build_decoder}


# ---------------------------------------------------------------------------------------------------------------


MALLOC_MODES = ("as-run", "system", "keep")


def _keeps_memory(impl: str, malloc: str) -> bool:
    return malloc == "keep" or (malloc == "as-run" and impl == "ours")


def _time_here(part: str, impl: str, device: torch.device, reps: int, warmup: int, malloc: str) -> dict:
    """In this (fresh) process: build, ``warmup`` untimed repetitions (the first training step creates the AdamW
    state; the heap settles over the next), then ``reps`` timed ones; faults and peak memory alongside."""
    if device.type == "cpu" and _keeps_memory(impl, malloc):
        from rae_cli.cpu_malloc import keep_freed_memory

        keep_freed_memory()
    fn = BUILDERS[part](impl, device)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: the peak so far (build + warm-up)
    times, faults = [], []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS, GiB
    return {"times_s": times, "minor_faults": faults, "peak_gib": peak,
            "peak_rss_above_build_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 2**20}


def _time_in_subprocess(args, part: str, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--_time-of", f"{part}:{impl}", "--device", args.device, "--threads",
           str(args.threads), "--reps", str(args.reps), "--warmup", str(args.warmup), "--malloc", args.malloc]
    cmd += ["--official-src", args.official_src] if args.official_src else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{part}/{impl} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-src", default=None, help="the official repository's src folder (omit: ours only)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first, per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--malloc", default="as-run", choices=MALLOC_MODES,
                   help="CPU allocator: as each program runs, glibc defaults for both, or freed memory kept for both")
    p.add_argument("--_time-of", dest="time_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.official_src:
        sys.path.insert(0, args.official_src)
    device = torch.device(args.device)
    if args.time_of:
        part, impl = args.time_of.split(":")
        print(json.dumps(_time_here(part, impl, device, args.reps, args.warmup, args.malloc)))
        return {}
    impls = ["ours", "official"] if args.official_src else ["ours"]
    parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    malloc = f", malloc {args.malloc}" if device.type == "cpu" else ""
    print(f"torch {torch.__version__}, {where}, fp32{malloc}, {args.rounds} rounds × ({args.warmup} warm-up + "
          f"{args.reps} timed) repetitions per implementation, each round in its own process, medians")
    results = {}
    for part in parts:
        runs = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                runs[impl].append(_time_in_subprocess(args, part, impl))
        ref = matmul_gflops(device)
        row = {"matmul_gflops": ref}
        for impl in impls:
            times = [t for r in runs[impl] for t in r["times_s"]]
            med = statistics.median(times)
            row[impl] = {"median_s": med, "min_s": min(times), "times_s": times,
                         # seconds × reference GFLOP/s: a machine-independent "matmul-equivalent GFLOP" size
                         "matmul_equiv_gflop": med * ref,
                         "minor_faults_median": statistics.median(f for r in runs[impl] for f in r["minor_faults"]),
                         "peak_gib": max(r["peak_gib"] for r in runs[impl]),
                         "keeps_freed_memory": device.type == "cpu" and _keeps_memory(impl, args.malloc)}
        if "official" in row:
            row["speed_vs_official"] = row["official"]["median_s"] / row["ours"]["median_s"]
        results[part] = row
        line = f"{part:8s} matmul ref {ref:6.1f} GFLOP/s"
        for impl in impls:
            r = row[impl]
            line += (f" | {impl} {r['median_s']:.3f} s (min {r['min_s']:.3f}, ×ref {r['matmul_equiv_gflop']:.0f} GFLOP,"
                     f" {r['minor_faults_median']:.0f} faults, peak {r['peak_gib']:.2f} GiB)")
        if "speed_vs_official" in row:
            line += f" | ours {row['speed_vs_official']:.3f}× the official speed"
        print(line, flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
