"""FID, Inception Score, precision/recall and the evaluation pipeline (rae_cli.fid).

The pipeline runs end to end on the RandomConvFeatureExtractor test double; the Inception wrapper is checked
with randomly initialised weights saved in torch-fidelity's format (the real ones cannot be downloaded here).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rae_cli import fid
from rae_cli.checkpoint import CheckpointError
from rae_cli.fid import (INCEPTION_WEIGHTS_FILE, InceptionFeatureExtractor, RandomConvFeatureExtractor,
                         WeightsNotFoundError, cache_key, compute_statistics, evaluate, extract_features,
                         frechet_distance, inception_score, precision_recall, reference_statistics)
from rae_cli.npz import ReferenceStats, save_image_folder, save_npz, save_reference_stats


def _noise_images(n: int, seed: int, size: int = 24) -> np.ndarray:
    """Distribution A: i.i.d. uniform pixel noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _smooth_images(n: int, seed: int, size: int = 24) -> np.ndarray:
    """Distribution B: dark smooth gradients with a random colour and direction, slight noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)
    out = []
    for _ in range(n):
        angle, colour = rng.uniform(0, np.pi), rng.uniform(0, 0.5, size=3)
        ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]  # (H, W)
        img = ramp[..., None] * colour * 255 + rng.normal(0, 4, size=(size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


class CountingExtractor:
    """Wraps an extractor and counts the images it has seen (to prove cache hits)."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, 0

    def features(self, images):
        self.seen += len(images)
        return self.inner.features(images)


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert math.isclose(frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), expected, rel_tol=1e-10)


def test_frechet_distance_one_dimensional():
    # 1-D Gaussians: (m1 − m2)² + (√v1 − √v2)²
    assert math.isclose(frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])),
                        9.0 + 1.0, rel_tol=1e-12)
    assert math.isclose(frechet_distance(0.5, 2.0, 0.5, 2.0), 0.0, abs_tol=1e-12)  # scalars are 1-D too


def test_frechet_distance_full_covariances_match_eigen_formula():
    # tr (Σ1Σ2)^½ = Σ √λ_i(Σ1^½ Σ2 Σ1^½): an independent route through symmetric eigen-decompositions
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 3))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T  # s2 is rank 3: singular
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert math.isclose(frechet_distance(mu1, s1, mu2, s2), expected, rel_tol=1e-7)
    assert math.isclose(frechet_distance(mu1, s1, mu1, s1), 0.0, abs_tol=1e-9)


def test_frechet_distance_falls_back_to_eps_offset_when_sqrtm_fails(monkeypatch):
    from scipy import linalg

    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m.copy())
        return np.full_like(m, np.inf) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    out = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    assert math.isclose(out, (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2), rel_tol=1e-5)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different features"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 7)), splits=10)
    assert math.isclose(mean, 1.0, abs_tol=1e-12) and math.isclose(std, 0.0, abs_tol=1e-12)


@pytest.mark.parametrize("splits", [1, 5])
def test_inception_score_of_confident_balanced_predictions_is_num_classes(splits):
    k = 8
    labels = torch.arange(k * 4 * splits) % k  # each split holds every class equally often
    logits = torch.nn.functional.one_hot(labels, k).double() * 1000.0  # softmax saturates to exactly one-hot
    mean, std = inception_score(logits, splits=splits)
    assert math.isclose(mean, k, rel_tol=1e-12) and math.isclose(std, 0.0, abs_tol=1e-9)


def test_inception_score_of_confident_single_class_is_one_and_errors():
    logits = np.zeros((20, 5))
    logits[:, 2] = 1000.0
    assert math.isclose(inception_score(logits, splits=2)[0], 1.0, abs_tol=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((3, 5)), splits=10)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        inception_score(np.zeros(5), splits=1)


# ------------------------------------------------------------------------------------------ precision / recall


def test_precision_recall_identical_sets_are_one():
    feats = np.random.default_rng(0).normal(size=(200, 16))
    assert precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters_are_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(100, 8)), rng.normal(size=(120, 8)) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_ball_radius_is_the_kth_other_neighbour():
    real = np.arange(11.0)[:, None]  # 0, 1, …, 10 on a line: k-th neighbour at distance k (k ≤ 5, inner points)
    fake = np.array([[10.5], [11.5], [12.5], [13.5]])
    # k = 1: the ball of 10 has radius 1 → only 10.5 is inside; k = 2: radius 2 → 10.5 and 11.5
    assert precision_recall(real, fake, k=1)[0] == 0.25
    assert precision_recall(real, fake, k=2)[0] == 0.5
    # recall, k = 1: the fakes' radii are 1, so only reals within 1 of a fake: 10 (from 10.5) → 1/11
    assert precision_recall(real, fake, k=1)[1] == pytest.approx(1 / 11)


def test_precision_recall_half_of_fakes_on_the_manifold_and_chunking_is_invisible():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(100, 8))
    fake = np.concatenate([real[:50] + 1e-4, rng.normal(size=(50, 8)) + 100.0])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5
    assert 0.0 < recall < 1.0  # the fakes cover only the neighbourhoods of half the reals
    assert precision_recall(real, fake, k=3, chunk=7) == (precision, recall)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], fake, k=3)
    with pytest.raises(ValueError, match="same D"):
        precision_recall(real, fake[:, :4])


# ------------------------------------------------------------------------------------------ extractors


def test_random_conv_test_double_is_seeded():
    images = _noise_images(5, seed=0)
    a, b = RandomConvFeatureExtractor(seed=0), RandomConvFeatureExtractor(seed=0)
    fa, fb = a.features(images), b.features(images)
    assert fa["pool"].shape == (5, 16) and fa["logits"].shape == (5, 10)
    assert torch.equal(fa["pool"], fb["pool"]) and a.name == b.name
    other = RandomConvFeatureExtractor(seed=1)
    assert not torch.allclose(other.features(images)["pool"], fa["pool"]) and other.name != a.name
    assert "test-double" in a.name


def test_inception_weights_missing_gives_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as err:
        InceptionFeatureExtractor()
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and "rae download fid-inception" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        InceptionFeatureExtractor(weights_path=tmp_path / "nowhere.pth")


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory):
    """A state dict in torch-fidelity's Inception format with random values (the real file is not available)."""
    import io

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # keep the random init
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    path = tmp_path_factory.mktemp("hub") / INCEPTION_WEIGHTS_FILE
    torch.save(model.state_dict(), path)  # PyTorch's default random init; BN running stats stay valid
    return path


def test_inception_extractor_wraps_torch_fidelity(fake_inception_weights):
    extractor = InceptionFeatureExtractor(weights_path=fake_inception_weights)
    out = extractor.features(_noise_images(1, seed=0, size=40))
    assert extractor.name == "inception-v3-compat"
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert out["pool"].dtype == torch.float32 and torch.isfinite(out["pool"]).all()


def test_inception_weights_are_found_in_the_torch_hub_cache(fake_inception_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILE).symlink_to(fake_inception_weights)
    assert fid.inception_weights_path() == tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert fid.inception_weights_path(fake_inception_weights) == fake_inception_weights


def test_evaluate_defaults_to_inception(fake_inception_weights):
    # FID itself is left out: scipy's sqrtm of a 2048×2048 matrix takes a minute on a small CPU
    a = _noise_images(2, seed=0, size=32)
    out = evaluate(a, a.copy(), inception_weights=fake_inception_weights, metrics=("is", "pr"), pr_k=1,
                   is_splits=1, device="cpu")
    assert out["extractor"] == "inception-v3-compat" and out["num_reference"] == 2
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["inception_score_mean"] >= 1.0


def test_inception_extractor_refuses_wrong_or_unsafe_files(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not the torch-fidelity Inception"):
        InceptionFeatureExtractor(weights_path=tmp_path / "wrong.pth")
    torch.save({"w": torch.zeros(1), "obj": CountingExtractor}, tmp_path / "pickled.pth")  # a class: code to run
    with pytest.raises(CheckpointError, match="weights_only"):
        InceptionFeatureExtractor(weights_path=tmp_path / "pickled.pth")


# ------------------------------------------------------------------------------------------ statistics


def test_compute_statistics_is_mean_and_unbiased_covariance_for_every_input_kind(tmp_path):
    images = _noise_images(30, seed=3)
    extractor = RandomConvFeatureExtractor()
    feats = extractor.features(images)["pool"].numpy().astype(np.float64)
    mu, sigma = compute_statistics(images, extractor, batch_size=7)
    assert mu.dtype == np.float64 and sigma.shape == (16, 16)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-8)
    save_npz(tmp_path / "a.npz", images)
    save_image_folder(images, tmp_path / "a")
    for source in (tmp_path / "a.npz", str(tmp_path / "a"), torch.from_numpy(images), [images[:10], images[10:]]):
        mu2, sigma2 = compute_statistics(source, extractor, batch_size=8)
        np.testing.assert_allclose(mu2, mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sigma2, sigma, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        compute_statistics(images[:1], extractor)


def test_default_cache_dir_follows_rae_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAE_HOME", str(tmp_path / "home"))
    assert fid.default_cache_dir() == tmp_path / "home" / "fid-stats"


def test_reference_statistics_are_cached_and_invalidated(tmp_path):
    ref = tmp_path / "ref.npz"
    save_npz(ref, _smooth_images(20, seed=0))
    extractor = CountingExtractor(RandomConvFeatureExtractor())
    cache = tmp_path / "cache"
    first = reference_statistics(ref, extractor, cache, batch_size=8)
    assert extractor.seen == 20
    assert [p.name for p in cache.iterdir()] == [f"{cache_key(ref, extractor.name)}.npz"]
    second = reference_statistics(ref, extractor, cache, batch_size=8)
    assert extractor.seen == 20  # served from the cache
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    assert second.num_images == 20 and second.features.shape == (20, 16)
    # new content (size/mtime change) → a new key, statistics recomputed
    save_npz(ref, _smooth_images(21, seed=1))
    reference_statistics(ref, extractor, cache, batch_size=8)
    assert extractor.seen == 41 and len(list(cache.iterdir())) == 2
    # another extractor never reuses these numbers
    assert cache_key(ref, "other") != cache_key(ref, extractor.name)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_end_to_end_with_the_test_double(tmp_path):
    a, a2, b = _noise_images(64, seed=0), _noise_images(64, seed=1), _smooth_images(64, seed=2)
    save_npz(tmp_path / "a.npz", a)
    save_image_folder(b, tmp_path / "b")
    extractor = CountingExtractor(RandomConvFeatureExtractor())
    cache = tmp_path / "cache"

    same = evaluate(a, tmp_path / "a.npz", extractor=extractor, batch_size=16, cache_dir=cache)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["num_generated"] == 64 and same["num_reference"] == 64
    assert same["extractor"] == extractor.name
    assert same["inception_score_mean"] >= 1.0 and same["inception_score_std"] >= 0.0
    json.dumps(same)  # JSON-able as is
    assert extractor.seen == 128 and len(list(cache.iterdir())) == 1

    fresh = evaluate(a2, tmp_path / "a.npz", extractor=extractor, batch_size=16, cache_dir=cache)
    assert extractor.seen == 192  # the reference came from the cache
    different = evaluate(b, tmp_path / "a.npz", extractor=extractor, batch_size=16, cache_dir=cache,
                         metrics=("fid", "pr"))
    assert 0 < fresh["fid"] < different["fid"]  # another sample of A is far closer than B
    assert different["precision"] == 0.0 and "inception_score_mean" not in different

    from_folder = evaluate(tmp_path / "b", b, extractor=extractor, batch_size=16, metrics=("fid",))
    assert from_folder["fid"] == pytest.approx(0.0, abs=1e-6) and set(from_folder) == {
        "extractor", "num_generated", "num_reference", "fid"}


def test_evaluate_uses_an_adm_reference_batch_statistics(tmp_path):
    a, b = _noise_images(40, seed=0), _smooth_images(40, seed=1)
    extractor = RandomConvFeatureExtractor()
    mu_b, sigma_b = compute_statistics(b, extractor)
    # ADM layout: images (here A) for precision/recall, mu/sigma (here of B) for FID
    np.savez(tmp_path / "adm_ref.npz", arr_0=a, mu=mu_b, sigma=sigma_b)
    out = evaluate(b, tmp_path / "adm_ref.npz", extractor=extractor, batch_size=16, cache_dir=tmp_path / "c")
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)  # the stored statistics, not the images, give FID
    assert out["precision"] == 0.0 and out["num_reference"] is None  # precision/recall against arr_0 = A
    # statistics only (no images): FID still works, precision/recall cannot be computed
    save_reference_stats(tmp_path / "stats.npz", ReferenceStats(mu=mu_b, sigma=sigma_b))
    out = evaluate(b, tmp_path / "stats.npz", extractor=extractor, batch_size=16)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6) and out["precision"] is None and out["recall"] is None


def test_evaluate_rejects_bad_requests(tmp_path):
    a = _noise_images(8, seed=0)
    extractor = RandomConvFeatureExtractor()
    with pytest.raises(ValueError, match="valid: fid, is, pr"):
        evaluate(a, a, extractor=extractor, metrics=("fid", "kid"))
    with pytest.raises(ValueError, match="need a reference"):
        evaluate(a, None, extractor=extractor)
    assert set(evaluate(a, None, extractor=extractor, metrics=("is",))) >= {"inception_score_mean"}
    np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d"):
        evaluate(a, tmp_path / "inception_stats.npz", extractor=extractor, metrics=("fid",))
    save_reference_stats(tmp_path / "other.npz", ReferenceStats(mu=np.zeros(16), sigma=np.eye(16), extractor="x"))
    with pytest.raises(ValueError, match="'x' features"):
        evaluate(a, tmp_path / "other.npz", extractor=extractor, metrics=("fid",))


def test_extract_features_keeps_input_order():
    images = _noise_images(10, seed=4)
    extractor = RandomConvFeatureExtractor()
    batched = extract_features(images, extractor, batch_size=3)
    single = np.concatenate([extractor.features(images[i:i + 1])["pool"].numpy() for i in range(10)])
    np.testing.assert_allclose(batched.pool, single, rtol=1e-5, atol=1e-6)
    assert batched.logits.shape == (10, 10)
    assert fid.METRICS == ("fid", "is", "pr")
