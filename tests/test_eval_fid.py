"""``rae eval-fid`` and rFID: the FID pipeline end to end on the random-CNN TEST DOUBLE (never real FID numbers).

The Inception weights cannot be downloaded here, so every metric value below comes from the test double; the
tests check the plumbing (inputs, cache, reference batches, JSON, warnings, errors), not Inception itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rae_cli.cli import app
from rae_cli.evaluate import TEST_DOUBLE_ENV, TEST_DOUBLE_WARNING

runner = CliRunner()


def _images(n: int, seed: int, bright: bool = False, size: int = 24) -> np.ndarray:
    """Smooth random-colour gradients with slight noise; ``bright`` shifts the distribution."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)
    out = []
    for _ in range(n):
        angle, colour = rng.uniform(0, np.pi), rng.uniform(0.5, 1.0, 3) if bright else rng.uniform(0, 0.5, 3)
        ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
        img = ramp[..., None] * colour * 255 + rng.normal(0, 4, size=(size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture
def sets(tmp_path):
    """gen.npz / ref folder from one distribution, other.npz from a brighter one."""
    from rae_cli.npz import save_image_folder, save_npz

    a, a2, b = _images(24, 0), _images(24, 1), _images(24, 2, bright=True)
    save_npz(tmp_path / "gen.npz", a)
    save_image_folder(a2, tmp_path / "ref")
    save_npz(tmp_path / "other.npz", b)
    save_npz(tmp_path / "same.npz", a2)
    return tmp_path


@pytest.fixture
def double(monkeypatch, tmp_path):
    """Select the test double through the environment (hidden from users) and isolate the stats cache."""
    from rae_cli.fid import default_cache_dir

    monkeypatch.setenv(TEST_DOUBLE_ENV, "random")
    monkeypatch.setenv("RAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae_home"))
    return default_cache_dir()


def run(*args):
    r = runner.invoke(app, ["eval-fid", *map(str, args)])
    if r.exit_code != 0:
        raise AssertionError(f"eval-fid {args} failed ({r.exit_code}): {r.output}\n{r.exception!r}")
    return r


def test_eval_fid_end_to_end_marked_as_test_double(sets, double):
    run(sets / "gen.npz", sets / "ref", "--out", sets / "same.json")
    r = run(sets / "gen.npz", sets / "other.npz", "--out", sets / "other.json")
    assert TEST_DOUBLE_WARNING in r.output
    same, other = (json.loads((sets / f).read_text()) for f in ("same.json", "other.json"))
    for res in (same, other):
        assert res["test_double"] is True and res["WARNING"] == TEST_DOUBLE_WARNING
        assert res["extractor"].startswith("random-conv-test-double")
        assert res["num_generated"] == 24 and res["num_reference"] == 24
        assert {"fid", "inception_score_mean", "inception_score_std", "precision", "recall"} <= set(res)
    assert 0 <= same["fid"] < other["fid"]  # same distribution is closer than a shifted one
    assert other["precision"] < same["precision"] or other["recall"] < same["recall"]


def test_identical_sets_folder_vs_npz_give_zero(sets, double):
    r = run(sets / "same.npz", sets / "ref", "metrics=[fid]")
    res = json.loads(r.stdout)  # no --out: the JSON goes to stdout
    assert abs(res["fid"]) < 1e-6 and "inception_score_mean" not in res


def test_reference_statistics_are_cached(sets, double, monkeypatch):
    from rae_cli import fid

    seen = []
    real = fid.extract_features

    def counting(images, extractor, batch_size=50):
        seen.append(str(images))
        return real(images, extractor, batch_size)

    monkeypatch.setattr(fid, "extract_features", counting)
    first = json.loads(run(sets / "gen.npz", sets / "ref", "metrics=[fid,pr]").stdout)
    assert len(list(double.glob("*.npz"))) == 1 and len(seen) == 2
    second = json.loads(run(sets / "gen.npz", sets / "ref", "metrics=[fid,pr]").stdout)
    assert len(seen) == 3 and seen[-1] == str(sets / "gen.npz")  # the reference came from the cache
    assert second["fid"] == first["fid"] and second["precision"] == first["precision"]
    run(sets / "gen.npz", sets / "ref", "metrics=[fid]", "cache=false")
    assert len(seen) == 5


def test_adm_reference_batch_with_precomputed_statistics(sets, double):
    """An npz holding mu/sigma (ADM reference batch) is used as is for FID; without images, pr is null."""
    from rae_cli.evaluate import make_extractor
    from rae_cli.fid import compute_statistics
    from rae_cli.npz import ReferenceStats, save_reference_stats

    mu, sigma = compute_statistics(sets / "ref", make_extractor())
    save_reference_stats(sets / "VIRTUAL_ref.npz", ReferenceStats(mu=mu, sigma=sigma))
    by_stats = json.loads(run(sets / "gen.npz", sets / "VIRTUAL_ref.npz").stdout)
    by_images = json.loads(run(sets / "gen.npz", sets / "ref", "cache=false").stdout)
    assert by_stats["fid"] == pytest.approx(by_images["fid"], rel=1e-9, abs=1e-9)
    assert by_stats["precision"] is None and by_stats["num_reference"] is None


def test_sample_then_eval_fid_pipeline(tmp_path, double):
    """`rae sample` (tiny, random TEST model) → `rae eval-fid` on its npz against its own PNG folder: FID 0."""
    torch.set_num_threads(1)
    r = runner.invoke(app, ["sample", "-p", "tiny", "--out", str(tmp_path / "s"), "dit_random_init=true",
                            "num_images=6", "num_steps=3"])
    assert r.exit_code == 0, r.output
    res = json.loads(run(tmp_path / "s" / "samples.npz", tmp_path / "s" / "images", "pr_k=2", "is_splits=2").stdout)
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["num_generated"] == 6 and res["test_double"] is True


def test_hidden_flag_and_bad_inputs(sets, monkeypatch, tmp_path):
    monkeypatch.delenv(TEST_DOUBLE_ENV, raising=False)
    monkeypatch.setenv("RAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "rae_home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch_home"))  # no Inception weights anywhere
    r = runner.invoke(app, ["eval-fid", str(sets / "gen.npz"), str(sets / "ref")])
    assert r.exit_code == 2 and "rae download fid-inception" in r.output
    r = runner.invoke(app, ["eval-fid", str(sets / "gen.npz"), str(sets / "ref"),
                            f"inception_weights={tmp_path / 'nope.pth'}"])
    assert r.exit_code == 2 and "nope.pth" in r.output

    r = runner.invoke(app, ["eval-fid", str(sets / "gen.npz"), str(sets / "ref"),
                            "--feature-extractor", "random-test-double", "metrics=[fid]"])
    assert r.exit_code == 0 and TEST_DOUBLE_WARNING in r.output
    assert "--feature-extractor" not in runner.invoke(app, ["eval-fid", "--help"]).output  # hidden

    r = runner.invoke(app, ["eval-fid", str(sets / "gen.npz"), "--feature-extractor", "random-test-double"])
    assert r.exit_code == 2 and "need a reference" in r.output
    r = runner.invoke(app, ["eval-fid", str(tmp_path / "missing.npz"), str(sets / "ref")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["eval-fid", str(sets / "gen.npz"), str(sets / "ref"), "metrics=[kid]"])
    assert r.exit_code == 2 and "fid, is, pr" in r.output


def test_rfid_function_for_recon(double):
    from rae_cli.evaluate import rfid
    from rae_cli.fid import RandomConvFeatureExtractor

    a, b = _images(16, 3), _images(16, 4, bright=True)
    assert abs(rfid(a, a)) < 1e-6  # extractor from $RAE_TEST_FEATURE_EXTRACTOR: the test double
    far = rfid(a, b, extractor=RandomConvFeatureExtractor(seed=1))
    near = rfid(a, _images(16, 5), extractor=RandomConvFeatureExtractor(seed=1))
    assert 0 < near < far
