"""Peak RSS of ``rae sample decode=false`` at two image counts: streaming keeps it flat as N grows.

Runs the real CLI in a subprocess per size (tiny random-init model, latents 32×16×16 so that the stacked array
would be visible) and prints the child's peak RSS and the size of the packed ``latents.safetensors``.

    python benchmarks/sample_memory.py --sizes 200 2000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


_WRAPPER = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-m', 'rae_cli', *sys.argv[1:]], "
            "check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_of(args: list[str]) -> float:
    """Peak RSS in MiB of ``python -m rae_cli ARGS``, read by a fresh wrapper process (its only child)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--latent-shape", default="32,16,16")
    args = p.parse_args(argv)
    c, h, w = (int(v) for v in args.latent_shape.split(","))
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "s"
            rss = peak_rss_of(["sample", "-p", "tiny", "--out", str(out), "dit_random_init=true", "decode=false",
                               f"num_images={n}", "num_steps=2", "batch_size=100", f"latent_shape=[{c},{h},{w}]",
                               "num_classes=10", "device=cpu"])
            packed = (out / "latents.safetensors").stat().st_size / 2**20
        rows.append((n, rss, packed))
        print(f"num_images {n:6d}  peak RSS {rss:8.1f} MiB  latents.safetensors {packed:8.1f} MiB", flush=True)
    if len(rows) > 1:
        (n0, r0, p0), (n1, r1, p1) = rows[0], rows[-1]
        print(f"peak RSS grew {r1 - r0:+.1f} MiB while the packed latents grew {p1 - p0:+.1f} MiB "
              f"({n0} → {n1} images)")


if __name__ == "__main__":
    main(sys.argv[1:])
