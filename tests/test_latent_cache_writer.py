"""cache-latents' single loader, background shard writer and statistics summed while encoding (tiny rae, CPU):
the same shards as a loader per shard, the statistics of a second pass, a write error that stops cleanly."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import image_folder
from rae_cli.cli import app
from typer.testing import CliRunner

SHAPE = (32, 4, 4)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = image_folder(tmp_path_factory.mktemp("img") / "images", per_class=4, classes=2)
    (root / "class1" / "broken.png").write_bytes(b"not a png")  # sorts first in class1: index 4
    return root


@pytest.fixture(scope="module")
def bf16_cache(images, tmp_path_factory) -> Path:
    """9 files in shards of 3 encoded in batches of 2 by one loader with 2 workers (batches the workers prepare
    run across shard boundaries), stored in bf16."""
    from rae_cli.config import resolve
    from rae_cli.latent_cache import CacheLatentsConfig, cache_latents

    out = tmp_path_factory.mktemp("cache") / "cache"
    cfg = resolve(CacheLatentsConfig, preset="tiny",
                  overrides=["shard_size=3", "batch_size=2", "num_workers=2", "dtype=bf16"])
    return cache_latents(cfg, images, out)


def test_one_loader_makes_the_shards_a_loader_per_shard_made(images, bf16_cache):
    """Reference: the former per-shard loop (each shard's images in batch_size chunks from its first image)."""
    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.data import load_image, scan_image_folder
    from rae_cli.errors import DataError
    from rae_cli.schema import RAEConfig

    rae = build_rae(resolve(RAEConfig, preset="tiny"), parts={"encoder"}).eval()
    files = scan_image_folder(images).files
    assert len(files) == 9
    for s in range(3):
        lat, src = [], []
        for lo in range(3 * s, 3 * s + 3, 2):
            good = []
            for i in range(lo, min(lo + 2, 3 * s + 3)):
                try:
                    good.append((i, load_image(files[i], 32, crop="adm")))
                except DataError:
                    pass
            if good:
                x = torch.stack([x for _, x in good])
                with torch.no_grad():
                    z = rae.encode(torch.cat([x, x.flip(-1)]))
                lat.append(torch.stack([z[:len(good)], z[len(good):]], 1).flatten(0, 1).bfloat16())
                src.extend(i for i, _ in good)
        got = load_file(str(bf16_cache / f"shard-{s:05d}.safetensors"))
        assert torch.equal(got["latents"], torch.cat(lat)), s
        assert got["source"].tolist() == [i for i in src for _ in range(2)]
    index = json.loads((bf16_cache / "index.json").read_text())
    assert [sh["images"] for sh in index["shards"]] == [3, 2, 3] and index["num_bad"] == 1


def test_statistics_summed_while_encoding_equal_a_second_pass(bf16_cache):
    from rae_cli.latent_cache_writer import load_shard_stats, shard_stats_from_file
    from rae_cli.latent_stats import LatentStats, load_stats

    two_pass, summed = LatentStats(SHAPE), LatentStats(SHAPE)
    for s in range(3):
        two_pass.merge(shard_stats_from_file(bf16_cache, s, SHAPE))  # reads the bf16 latents back
        part = load_shard_stats(bf16_cache, s, SHAPE)
        assert part is not None, f"shard {s} has no statistics partial"
        summed.merge(part)
    assert summed.n == two_pass.n == 16  # 8 images + mirrors
    # Sums of the stored (bf16-rounded) values: float64 rounding apart (unrounded fp32 values would be ~1e-3 off).
    torch.testing.assert_close(summed.sum, two_pass.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed.sum_sq, two_pass.sum_sq, rtol=1e-12, atol=1e-12)
    mean, var = load_stats(bf16_cache / "stats.safetensors")
    want_mean, want_var = two_pass.finalize()
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=1e-7)
    stored = load_file(str(bf16_cache / "stats.safetensors"))
    assert sorted(stored) == ["mean", "var"] and stored["mean"].dtype == torch.float32  # format unchanged


def test_a_shard_without_its_partial_is_read_once(bf16_cache, tmp_path):
    """A cache from an older version (no partial-stats/): its shards are read for the statistics, once."""
    import shutil

    from rae_cli.distributed import Dist
    from rae_cli.latent_cache import _exact_stats
    from rae_cli.latent_cache_writer import shard_stats_path

    c = tmp_path / "c"
    shutil.copytree(bf16_cache, c)
    want = _exact_stats(c, 3, SHAPE, Dist())
    shard_stats_path(c, 1).unlink()
    got = _exact_stats(c, 3, SHAPE, Dist())
    assert shard_stats_path(c, 1).is_file()  # stored for the next time
    torch.testing.assert_close(got.sum, want.sum, rtol=1e-12, atol=1e-12)
    # A partial that does not describe the shard on disk is not trusted.
    shutil.copy(shard_stats_path(c, 0), shard_stats_path(c, 2))
    torch.testing.assert_close(_exact_stats(c, 3, SHAPE, Dist()).sum_sq, want.sum_sq, rtol=1e-12, atol=1e-12)


def test_a_failed_shard_write_stops_with_a_clear_error_and_a_rerun_resumes(images, bf16_cache, tmp_path,
                                                                         monkeypatch):
    import rae_cli.latent_cache_writer as writer

    real = writer.write_shard

    def full_disk(out, s, *args):
        if s == 1:
            raise OSError(28, "No space left on device")
        real(out, s, *args)

    monkeypatch.setattr(writer, "write_shard", full_disk)
    args = ["cache-latents", str(images), "--out", str(tmp_path / "c"), "-p", "tiny", "shard_size=3",
            "batch_size=2", "num_workers=0", "dtype=bf16"]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "could not write" in text and "No space left on device" in text and "re-run" in text, text
    assert "Traceback" not in res.output
    left = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert "shard-00000.safetensors" in left and "shard-00001.safetensors" not in left
    assert not any(n.endswith(".tmp") for n in left) and "index.json" not in left
    monkeypatch.undo()
    res = cli(*args)
    assert res.exit_code == 0, res.output
    for name in ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
                 "stats.safetensors"]:
        a, b = load_file(str(bf16_cache / name)), load_file(str(tmp_path / "c" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (bf16_cache, tmp_path / "c"))
    assert ia == ib


def test_shard_writer_keeps_at_most_one_shard_waiting(tmp_path):
    from rae_cli.latent_cache_writer import ShardWriter

    taken, release, written = threading.Event(), threading.Event(), []

    def slow(out, s, *args):
        taken.set()
        assert release.wait(10)
        written.append(s)

    w = ShardWriter(tmp_path, write=slow)
    w.submit(0, {}, {}, None)
    assert taken.wait(5)  # shard 0 is being written
    w.submit(1, {}, {}, None)  # shard 1 waits
    third = threading.Thread(target=w.submit, args=(2, {}, {}, None))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # the encoder blocks rather than pile up shards in memory
    release.set()
    third.join(5)
    w.close()
    assert written == [0, 1, 2] and w.written == [0, 1, 2]
