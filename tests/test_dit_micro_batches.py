"""train-dit's loader items are micro-batches in the cache's dtype (fp32 only on the device), and the losses are
those of the earlier whole-step items (pinned on that code: same draws per (seed, rank, step, micro-batch))."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dit_training_helpers import image_folder, synthetic_cache
from rae_cli.config import resolve
from rae_cli.train_dit import TrainDiTConfig, train_dit

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Losses of the tiny preset (global batch 8, grad_accum_steps=2, 3 steps) computed with the whole-step loader items
# of the code before this change (commit c6bd085); the micro-batch loader must reproduce them.
PINNED = {"fp16": [1.9685977697372437, 1.9490602016448975, 2.028569221496582],
          "bf16": [1.9684414863586426, 1.9488779306411743, 2.0287086963653564],
          "images": [2.0387840270996094, 1.9846479892730713]}  # on the fly, 4 images a step, 2 steps


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_an_item_is_one_micro_batch_in_the_cache_dtype(tmp_path, dtype):
    from rae_cli.dit_batches import CacheSource, MicroBatchOrder, MicroBatches, collate_micro
    from rae_cli.latent_cache import LatentCache

    cache = LatentCache(synthetic_cache(tmp_path / "cache", dtype=dtype))
    assert cache.dtype == DTYPES[dtype]
    cfg = resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={tmp_path / 'cache'}"])  # G = 8
    # Rank 1 of 2, 2 accumulation steps: micro-batches of 2 samples, positions 4-5 then 6-7 of the global batch.
    items = MicroBatches(cfg, CacheSource(cache), cache.num_images, 4, rank=1, world_size=2, shift=1.0, accum=2)
    loader = torch.utils.data.DataLoader(items, sampler=MicroBatchOrder(3, 5, 2), batch_size=None,
                                         collate_fn=collate_micro)
    got = list(loader)
    assert len(got) == 4  # steps 3 and 4, two micro-batches each
    for (x, y, pos, skipped), lo in zip(got, [4, 6, 4, 6]):
        assert x.dtype == DTYPES[dtype] and x.shape == (2, 32, 4, 4) and y.shape == (2,) and skipped == []
        assert pos.tolist() == [lo, lo + 1]
    # The same samples, values and order as the step's share read at once in fp32 (the rows of the old item).
    step_images = items.images_of_step(3)[4:8]
    mirror = torch.cat([p for _, _, p, _ in got[:2]])  # positions 4..7
    from rae_cli.dit_batches import step_draws

    flips = step_draws(cfg, 3, 1.0).u_mirror[mirror] < 0.5
    whole, labels = cache.read(cache.rows(step_images, flips))
    assert whole.dtype == torch.float32
    assert torch.equal(torch.cat([x for x, *_ in got[:2]]).float(), whole)
    assert torch.equal(torch.cat([y for _, y, *_ in got[:2]]), labels)


def test_training_sees_micro_batches_in_the_cache_dtype_and_the_pinned_losses(tmp_path, monkeypatch):
    import rae_cli.dit_batches as dit_batches

    seen = []
    real = dit_batches.micro_batch

    def spy(cfg, step, inputs, x, y, pos, **kw):
        seen.append((step, x.dtype, tuple(x.shape), pos.tolist()))
        z, *rest = out = real(cfg, step, inputs, x, y, pos, **kw)
        assert z.dtype == torch.float32  # converted on the device
        return out

    monkeypatch.setattr(dit_batches, "micro_batch", spy)
    for dtype in ("fp16", "bf16"):
        cache = synthetic_cache(tmp_path / f"cache-{dtype}", dtype=dtype)
        cfg = resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", "max_steps=3", "grad_accum_steps=2"])
        seen.clear()
        train_dit(cfg=cfg, out_dir=tmp_path / dtype)
        assert seen == [(s, DTYPES[dtype], (4, 32, 4, 4), list(range(lo, lo + 4))) for s in range(3) for lo in (0, 4)]
        assert losses(tmp_path / dtype) == pytest.approx(PINNED[dtype], rel=1e-6, abs=0)


def test_on_the_fly_encoding_keeps_the_pinned_losses(tmp_path):
    imgs = image_folder(tmp_path / "images", per_class=4, classes=2)
    cfg = resolve(TrainDiTConfig, preset="tiny", overrides=["max_steps=2", "grad_accum_steps=2", "stats=none",
                                                            "global_batch_size=4"])
    train_dit(cfg=dataclasses.replace(cfg, images=str(imgs)), out_dir=tmp_path / "run")
    assert losses(tmp_path / "run") == pytest.approx(PINNED["images"], rel=1e-6, abs=0)
