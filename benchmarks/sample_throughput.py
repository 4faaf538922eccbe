"""Sampling throughput of a ``rae sample`` preset: images/s and network evaluations per image, per guidance mode.

Runs the same path as ``rae sample`` (per-image noise, the guidance wrapper, the sampler; optionally the decoder),
after one warm-up batch. Without the released weights, ``--random-init`` times the same architectures with random
weights (the arithmetic is identical). One JSON line per guidance mode on stdout.

    python benchmarks/sample_throughput.py -p dit-dh-xl_in256 --random-init --guidance none,cfg,autoguidance \
        --images 256 batch_size=64 device=cuda
    python benchmarks/sample_throughput.py -p tiny --random-init --images 16           # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg, device: torch.device, random_init: bool, decode: bool):
    """(Sampling, rae or None, params) for ``cfg``; random weights for the main and guide models if asked."""
    from rae_cli.build import build_rae
    from rae_cli.dit import count_parameters
    from rae_cli.guidance import CountingModel
    from rae_cli.sample import Sampling, _network, prepare
    from rae_cli.schema import FlowConfig
    from rae_cli.stage2_loading import build_stage2

    if not random_init:
        sampling, rae, stage2 = prepare(cfg, device)
        guide_params = None
        return sampling, rae, {"main": count_parameters(stage2.model).total, "guide": guide_params}
    if cfg.latent_shape is None or cfg.num_classes is None:
        raise SystemExit("--random-init needs latent_shape=[C,h,w] and num_classes=N (e.g. latent_shape=[768,16,16] "
                         "num_classes=1000 for the 256 presets, [768,32,32] for 512)")
    main = build_stage2(None, cfg.dit, latent_shape=cfg.latent_shape, num_classes=cfg.num_classes,
                        random_init=True, device=device)
    g = cfg.guidance
    guide = None
    if g.active and g.method == "autoguidance":
        guide = build_stage2(None, g.guide_dit or cfg.dit, latent_shape=cfg.latent_shape,
                             num_classes=cfg.num_classes, random_init=True, device=device, what="guide model")
    bf16 = cfg.dtype == "bf16"
    sampling = Sampling(model=CountingModel(_network(main.model, bf16, device)),
                        guide=CountingModel(_network(guide.model, bf16, device)) if guide else None,
                        latent_shape=main.latent_shape, num_classes=main.num_classes,
                        shift=(cfg.flow or FlowConfig()).resolved_shift(main.latent_shape), cfg=cfg, device=device)
    rae = build_rae(cfg.rae, device=device).eval() if decode else None
    return sampling, rae, {"main": count_parameters(main.model).total,
                           "guide": count_parameters(guide.model).total if guide else None}


def measure(cfg, device: torch.device, images: int, random_init: bool, decode: bool) -> dict:
    from rae_cli.sample import class_labels

    sampling, rae, params = build(cfg, device, random_init, decode)
    labels = class_labels(images + cfg.batch_size, sampling.num_classes, cfg.seed, "random")

    def run(indices: list[int]) -> None:
        z = sampling.latents(indices, labels[indices])
        if rae is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
                rae.decode(z).float().clamp(0, 1)

    with torch.no_grad():
        run(list(range(images, images + cfg.batch_size)))  # warm-up (kernels, allocator), not timed
        sampling.model.reset()
        if sampling.guide is not None:
            sampling.guide.reset()
        _sync(device)
        start = time.perf_counter()
        for s in range(0, images, cfg.batch_size):
            run(list(range(s, min(images, s + cfg.batch_size))))
        _sync(device)
        seconds = time.perf_counter() - start
    g = cfg.guidance
    return {
        "guidance": g.method if g.active else "none", "scale": g.scale, "method": cfg.method,
        "num_steps": cfg.num_steps, "images": images, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
        "decode": rae is not None, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "random_init": random_init, "params": params, "seconds": seconds, "images_per_second": images / seconds,
        "network_evaluations_per_image": {"main": sampling.model.samples / images,
                                          "guide": sampling.guide.samples / images if sampling.guide else 0.0},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-p", "--preset", required=True, help="A sample preset (rae presets sample) or YAML path.")
    p.add_argument("--guidance", default=None, help="Comma-separated modes to time: none, cfg, autoguidance "
                                                    "(default: the preset's own).")
    p.add_argument("--images", type=int, default=64, help="Images timed per mode (after one warm-up batch).")
    p.add_argument("--random-init", action="store_true", help="Random weights: no checkpoint needed.")
    p.add_argument("--decode", action="store_true", help="Include the RAE decoder (needs its weights).")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for rae sample.")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from rae_cli.build import device_of
    from rae_cli.sample import resolve_sample_config

    overrides = list(args.overrides)
    if args.random_init:
        overrides.append("dit_random_init=true")
    _, base = resolve_sample_config(args.preset, overrides)
    device = device_of(base.device)
    torch.set_float32_matmul_precision("high")  # TF32 on NVIDIA GPUs, as the official sampler (--tf32 default on)
    modes = args.guidance.split(",") if args.guidance else [base.guidance.method]
    for mode in modes:
        g = base.guidance
        if mode != g.method:
            scale = g.scale if g.scale != 1.0 else 1.5  # a guided mode needs a scale ≠ 1 to cost anything
            g = dataclasses.replace(g, method=mode, scale=1.0 if mode == "none" else scale)
        cfg = dataclasses.replace(base, guidance=g)
        print(json.dumps({"preset": args.preset, **measure(cfg, device, args.images, args.random_init,
                                                            args.decode)}), flush=True)


if __name__ == "__main__":
    main()
