"""One-step vs 50-step sampling cost at DiT-DH-XL size: network evaluations per image and images/s, in one run.

A randomly initialised DiT-DH-XL with MeanFlow's second time input (presets/dit/dit-dh-xl-meanflow.yaml) on
[768, 16, 16] latents (ImageNet 256), 1000 classes. The same model is sampled through the ``rae sample`` code path
(:class:`rae_cli.sample.Sampling`: per-image noise, counting wrapper): method=meanflow with 1 and 2 steps, and the
50-point Euler grid of the flow presets (49 evaluations; a MeanFlow model at r = t is a flow model). Random weights
give the same arithmetic as trained ones. Latents only (no decoder). One JSON line per sampler on stdout.

    python benchmarks/meanflow_sampling.py --images 2 --batch 2                 # CPU, small counts
    python benchmarks/meanflow_sampling.py --images 256 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dit", default="dit-dh-xl-meanflow", help="dit preset (default: DiT-DH-XL + second time)")
    ap.add_argument("--euler-points", type=int, default=50)
    args = ap.parse_args()

    from rae_cli.config import resolve
    from rae_cli.dit import count_parameters
    from rae_cli.guidance import CountingModel
    from rae_cli.sample import SampleConfig, Sampling, _network, class_labels
    from rae_cli.schema import DiTConfig
    from rae_cli.stage2_loading import build_stage2

    device = torch.device(args.device)
    dit = resolve(DiTConfig, preset=args.dit)
    latent_shape, num_classes = [768, 16, 16], 1000
    torch.manual_seed(0)
    stage2 = build_stage2(None, dit, latent_shape=latent_shape, num_classes=num_classes, random_init=True,
                          device=device)
    params = count_parameters(stage2.model).total
    shift = (768 * 16 * 16 / 4096) ** 0.5
    runs = [("meanflow", 1), ("meanflow", 2), ("euler", args.euler_points)]
    for method, steps in runs:
        cfg = SampleConfig(method=method, num_steps=steps, num_images=args.images, batch_size=args.batch,
                           device=args.device, decode=False)
        counting = CountingModel(_network(stage2.model, False, device))
        sampling = Sampling(model=counting, guide=None, latent_shape=tuple(latent_shape), num_classes=num_classes,
                            shift=shift, cfg=cfg, device=device)
        labels = class_labels(args.images, num_classes, 0)
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(0, args.images, args.batch):
                idx = list(range(i, min(i + args.batch, args.images)))
                sampling.latents(idx, labels[idx])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        print(json.dumps({"model": dit.name, "second_time": dit.second_time, "params": params, "method": method,
                          "num_steps": steps, "nfe_per_image": counting.samples / args.images,
                          "images": args.images, "batch": args.batch, "seconds": round(seconds, 2),
                          "images_per_s": round(args.images / seconds, 4), "device": str(device),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
