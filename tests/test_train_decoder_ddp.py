"""``train-decoder`` under torchrun (2 gloo processes on CPU): the discriminator is really data-parallel.

The official trainer updated each rank's discriminator from its own gradients (spec §10.1 #8), so the copies drift
apart; ours all-reduces them, so after training every rank holds the same heads (and the same decoder and EMA).
TEST DOUBLES: random-init encoder (rae=tiny) and discriminator backbone (tiny preset); LPIPS is switched off here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rae_cli.checkpoint import load_safetensors

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys
    from rae_cli.checkpoint import save_safetensors
    from rae_cli.config import resolve
    from rae_cli.train_decoder import TrainDecoderConfig, train_decoder

    images, out = sys.argv[1], sys.argv[2]
    cfg = resolve(TrainDecoderConfig, preset="tiny", overrides=[
        f"data.path={images}",
        "loss.perceptual_weight=0",      # no LPIPS: this test is about the discriminator's synchronisation
        "train.micro_batch_size=1",      # 4 = 2 processes x 1 image x 2 accumulation steps (exercises no_sync)
        "train.epochs=2",                # 4 steps, the discriminator trains on all of them
    ])
    result = train_decoder(cfg=cfg, out_dir=out)
    state = {}
    for name, module in (("disc", result.disc), ("decoder", result.decoder), ("ema", result.ema_decoder)):
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    save_safetensors(f"{out}/rank{os.environ['RANK']}.safetensors", state)
""")


def _write_images(root: Path, n: int = 10) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        arr = rng.integers(0, 256, (40 + 2 * i, 44, 3), dtype=np.uint8)
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i}.png")


def test_ddp_discriminator_stays_identical_across_ranks(tmp_path):
    images, out = tmp_path / "images", tmp_path / "run"
    _write_images(images)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(images), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, _ = load_safetensors(out / "rank0.safetensors")
    rank1, _ = load_safetensors(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert any(k.startswith("disc.heads.") and k.endswith("weight_orig") for k in rank0)
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"ranks disagree on {differ[:6]}"

    # The discriminator did train (its heads moved away from their initialisation), on 4 steps of 2×2 images.
    from rae_cli.config import resolve
    from rae_cli.train_decoder import TrainDecoderConfig, build_disc

    init = build_disc(resolve(TrainDecoderConfig, preset="tiny").disc, seed=0).state_dict()
    assert any(not torch.equal(v, rank0[f"disc.{k}"]) for k, v in init.items() if k.endswith("weight_orig"))
    # Rank 0 alone wrote the checkpoints and the export.
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000000002", "step-000000004"]
    assert (out / "export" / "decoder.safetensors").is_file()
    ema, _ = load_safetensors(out / "export" / "decoder.safetensors")
    assert all(torch.equal(v, rank0[f"ema.{k}"]) for k, v in ema.items())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
