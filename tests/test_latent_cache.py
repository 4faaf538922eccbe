"""cache-latents on the tiny (random-init) rae: content, exact stats, bad images, resume, torchrun; then train-dit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dit_training_helpers import image_folder
from rae_cli.cli import app

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    return res


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = image_folder(tmp_path_factory.mktemp("img") / "images", per_class=3, classes=2)
    (root / "class1" / "broken.png").write_bytes(b"this is not a png")  # sorts first in class1
    return root


@pytest.fixture(scope="module")
def cache(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    res = cli("cache-latents", str(images), "--out", str(out), "-p", "tiny", "shard_size=2")
    assert res.exit_code == 0, res.output
    assert "1 unreadable skipped" in res.output
    return out


def shard_tensors(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(cache.glob("shard-*.safetensors"))}


def test_cache_holds_the_raw_latents_of_each_image_and_its_mirror(images, cache):
    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.data import load_image
    from rae_cli.latent_cache import LatentCache
    from rae_cli.schema import RAEConfig

    index = json.loads((cache / "index.json").read_text())
    assert index["num_files"] == 7 and index["num_images"] == 6 and index["num_entries"] == 12
    assert index["num_bad"] == 1 and index["bad_files"][0]["path"].endswith("broken.png")
    assert index["classes"] == ["class0", "class1"] and index["latent_shape"] == [32, 4, 4]
    assert len(index["shards"]) == 4 and index["normalized"] is False

    rae = build_rae(resolve(RAEConfig, preset="tiny"), parts={"encoder"}).eval()
    files = [line.split("\t") for line in (cache / "files.txt").read_text().splitlines()]
    c = LatentCache(cache)
    lat, lab = c.read(torch.arange(len(c)))
    src = torch.cat([t["source"] for t in shard_tensors(cache).values()])
    for row in range(len(c)):
        _, label, rel = files[int(src[row])]
        x = load_image(images / rel, 32, crop="adm")[None]
        if row % 2:
            x = x.flip(-1)  # odd rows hold the horizontal mirror
        torch.testing.assert_close(lat[row], rae.encode(x)[0], atol=1e-5, rtol=1e-5)
        assert lab[row] == int(label)


def test_stats_are_the_exact_float64_moments_of_the_cached_latents(cache):
    from rae_cli.latent_stats import load_stats

    z = torch.cat([t["latents"] for t in shard_tensors(cache).values()]).double()
    mean, var = load_stats(cache / "stats.safetensors")
    torch.testing.assert_close(mean.double(), z.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), z.var(0, unbiased=False), atol=1e-6, rtol=1e-6)


def test_rerun_resumes_after_an_interrupted_run(images, cache, tmp_path, monkeypatch):
    part = tmp_path / "part"
    shutil.copytree(cache, part)
    (part / "shard-00003.safetensors").unlink()  # as if killed while encoding the last shard
    (part / "index.json").unlink()
    (part / "stats.safetensors").unlink()
    untouched = (part / "shard-00000.safetensors").stat().st_mtime_ns
    # The finished shards' statistics come from their partials: a resume never reads a shard back.
    import rae_cli.latent_cache_writer as writer

    def no_second_pass(*args):
        raise AssertionError("a finished shard was read back for the statistics")

    monkeypatch.setattr(writer, "shard_stats_from_file", no_second_pass)
    res = cli("cache-latents", str(images), "--out", str(part), "-p", "tiny", "shard_size=2")
    assert res.exit_code == 0, res.output
    monkeypatch.undo()
    assert (part / "shard-00000.safetensors").stat().st_mtime_ns == untouched  # finished shards are kept
    a, b = shard_tensors(cache), shard_tensors(part)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    sa, sb = load_file(str(cache / "stats.safetensors")), load_file(str(part / "stats.safetensors"))
    assert torch.equal(sa["mean"], sb["mean"]) and torch.equal(sa["var"], sb["var"])
    assert json.loads((part / "index.json").read_text()) == json.loads((cache / "index.json").read_text())
    # Other settings in the same folder are refused rather than mixed in.
    res = cli("cache-latents", str(images), "--out", str(part), "-p", "tiny", "shard_size=2", "dtype=bf16")
    assert res.exit_code == 2 and "different settings" in res.output and "dtype" in res.output


def test_bf16_cache_is_memory_mapped_back_exactly(tmp_path):
    from rae_cli.config import resolve
    from rae_cli.latent_cache import LatentCache, write_cache
    from rae_cli.schema import RAEConfig

    z = torch.randn(5, 3, 2, 2) * 3
    write_cache(tmp_path / "c", z, [0, 1, 0, 1, 0], rae=resolve(RAEConfig, preset="tiny"), classes=["a", "b"],
                dtype="bf16", shard_size=2)
    c = LatentCache(tmp_path / "c")
    lat, lab = c.read([4, 0, 3])
    assert torch.equal(lat, z[[4, 0, 3]].bfloat16().float()) and lab.tolist() == [0, 0, 1]
    assert c.copies == 1 and len(c) == 5
    with pytest.raises(IndexError):
        c.read([5])


def test_two_processes_build_the_same_cache(images, cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rae_cli",
           "cache-latents", str(images), "--out", str(out), "-p", "tiny", "shard_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = shard_tensors(cache), shard_tensors(out)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], atol=1e-6, rtol=1e-6)
    sa, sb = load_file(str(cache / "stats.safetensors")), load_file(str(out / "stats.safetensors"))
    for k in ("mean", "var"):
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-6)
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (cache, out))
    assert ia["num_bad"] == ib["num_bad"] == 1 and ia["shards"] == ib["shards"]
    # Each shard's statistics partial (summed by whichever process encoded it) is that of the 1-process cache, to
    # the tolerance of the shards themselves (the encoder's float sums depend on the thread count).
    from rae_cli.latent_cache_writer import load_shard_stats

    for s in range(4):
        pa, pb = (load_shard_stats(c, s, (32, 4, 4)) for c in (cache, out))
        assert pb is not None and pa.n == pb.n
        torch.testing.assert_close(pa.sum, pb.sum, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(pa.sum_sq, pb.sum_sq, rtol=1e-6, atol=1e-5)


def test_train_dit_from_the_cache_and_on_the_fly(images, cache, tmp_path):
    from rae_cli.train_dit import load_trained_dit

    res = cli("train-dit", "-p", "tiny", "--cache", str(cache), "--out", str(tmp_path / "c"), "global_batch_size=4",
              "max_steps=2")
    assert res.exit_code == 0, res.output
    model, cfg = load_trained_dit(tmp_path / "c")
    assert cfg.num_classes == 2 and cfg.latent_shape == [32, 4, 4]
    # The run folder alone is enough for `rae sample` (model, rae with the stats used, shift, classes).
    res = cli("sample", "-p", "tiny", "--out", str(tmp_path / "s"), f"checkpoint={tmp_path / 'c'}", "num_images=2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "samples.npz").is_file()
    # On the fly: the frozen tiny encoder runs every step; the cache's stats file serves as rae.stats.
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(images.glob("class0/*.png")):
        shutil.copy(p, flat / p.name)
    res = cli("train-dit", "-p", "tiny", "--data", str(flat), "--out", str(tmp_path / "f"), "global_batch_size=2",
              "max_steps=2", f"rae.stats={cache / 'stats.safetensors'}")
    assert res.exit_code == 0, res.output
    model, cfg = load_trained_dit(tmp_path / "f")
    assert cfg.num_classes == 1  # a flat folder trains an unconditional (single-class) model
    assert cfg.images == str(flat.resolve())
