"""Exact per-element latent statistics: accumulation, merge / all-reduce, files (ours and official)."""

from __future__ import annotations

import pytest
import torch

from rae_cli.checkpoint import CheckpointError, load_safetensors
from rae_cli.latent_stats import LatentStats, all_reduce_, load_stats, save_stats


def _data(n=37, shape=(4, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return 5.0 + 2.0 * torch.randn(n, *shape, generator=g, dtype=torch.float64)


def test_exact_population_stats_independent_of_batching():
    z = _data()
    ref_mean, ref_var = z.mean(0), z.var(0, unbiased=False)
    for sizes in ([37], [1] * 37, [10, 20, 7], [36, 1]):
        acc = LatentStats()
        for chunk in z.split(sizes):
            acc.update(chunk.float())
        mean, var = acc.finalize()
        assert acc.n == 37 and mean.dtype == torch.float32 and mean.shape == (4, 3, 3)
        torch.testing.assert_close(mean.double(), z.float().double().mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(var.double(), z.float().double().var(0, unbiased=False), atol=1e-5, rtol=0)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(var.double(), ref_var, atol=1e-4, rtol=0)


def test_deterministic_and_accurate_with_large_offset():
    z = 1000.0 + 0.01 * _data(64, (8,), seed=1)  # a mean far from 0: sums of squares cancel heavily
    runs = []
    for _ in range(2):
        acc = LatentStats((8,))
        for chunk in z.split(5):
            acc.update(chunk)
        runs.append(acc.finalize())
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][1].double(), z.var(0, unbiased=False), atol=1e-8, rtol=1e-3)


def test_merge_and_reduce_equal_single_pass():
    z = _data()
    whole = LatentStats()
    whole.update(z)
    a, b = LatentStats(), LatentStats()
    a.update(z[:11])
    b.update(z[11:])
    merged = LatentStats().merge(a).merge(b)
    for x, y in zip(merged.finalize(), whole.finalize()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)

    # What an all-reduce(SUM) over two ranks does to the reduce tensors:
    ra, rb = LatentStats(), LatentStats()
    ra.update(z[:20])
    rb.update(z[20:])
    for ta, tb in zip(ra.tensors_to_reduce(), rb.tensors_to_reduce()):
        ta += tb
    for x, y in zip(ra.finalize(), whole.finalize()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    acc = LatentStats()
    acc.update(_data())
    before = [t.clone() for t in acc.tensors_to_reduce()]
    all_reduce_(acc)  # not initialized: a no-op
    assert all(torch.equal(x, y) for x, y in zip(before, acc.tensors_to_reduce()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        all_reduce_(acc)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(x, y) for x, y in zip(before, acc.tensors_to_reduce()))


def test_errors():
    acc = LatentStats()
    with pytest.raises(ValueError, match="no latents"):
        acc.finalize()
    with pytest.raises(ValueError, match="shape"):
        acc.tensors_to_reduce()
    acc.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="does not match"):
        acc.update(torch.zeros(2, 4))


def test_save_load_round_trip_and_official_semantics(tmp_path):
    acc = LatentStats()
    acc.update(_data().float())
    mean, var = acc.finalize()
    save_stats(tmp_path / "stats.safetensors", mean, var, acc.n, {"encoder": "dinov2-b"})
    tensors, meta = load_safetensors(tmp_path / "stats.safetensors")
    assert set(tensors) == {"mean", "var"} and meta["count"] == 37 and meta["encoder"] == "dinov2-b"
    m2, v2 = load_stats(tmp_path / "stats.safetensors")
    assert torch.equal(m2, mean) and torch.equal(v2, var)

    torch.save({"mean": mean}, tmp_path / "mean_only.pt")  # official: missing var -> 1
    m3, v3 = load_stats(tmp_path / "mean_only.pt")
    assert torch.equal(m3, mean) and torch.equal(v3, torch.ones_like(mean))
    torch.save({"var": var}, tmp_path / "var_only.pt")  # missing mean -> 0
    m4, _ = load_stats(tmp_path / "var_only.pt")
    assert torch.equal(m4, torch.zeros_like(var))
    torch.save({"something": var}, tmp_path / "neither.pt")
    with pytest.raises(CheckpointError, match="neither 'mean' nor 'var'"):
        load_stats(tmp_path / "neither.pt")
