"""The quickstart's judges: the independent MLP feature space and the per-class diversity ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rae_cli.digits_eval import diversity_ratio, evaluate_digits
from rae_cli.toy_data import (export_digits, fit_digit_mlp, load_digits_arrays, mlp_hidden_features, split_indices,
                              to_digit_features, upsample)


def test_diversity_ratio_measures_spread_per_class():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 5))
    labels = np.repeat([0, 1], 20)
    real[labels == 1] += 10  # far-apart classes: the ratio is per class, not over the mix
    assert diversity_ratio(real, labels, real, labels)[0] == pytest.approx(1.0)
    means = np.stack([real[labels == c].mean(0) for c in (0, 1)])[labels]
    shrunk = means + 0.5 * (real - means)  # every class half as spread out
    ratio, per_class = diversity_ratio(shrunk, labels, real, labels)
    assert ratio == pytest.approx(0.5) and set(per_class) == {"0", "1"}
    collapsed = means.copy()  # mode collapse: one image per class
    collapsed[::2] += 1e-9
    assert diversity_ratio(collapsed, labels, real, labels)[0] < 1e-6


def test_mlp_judge_reads_digits_and_separates_classes():
    images, labels = load_digits_arrays()
    _, test = split_indices(labels, 0.2, 0)
    judge = fit_digit_mlp()
    x = to_digit_features(upsample(images[test], 32))
    assert (judge.predict(x) == labels[test]).mean() > 0.9  # trained on the train split only
    h = mlp_hidden_features(judge, x)
    assert h.shape == (len(test), 64) and (h >= 0).all()
    # Same-class digits are closer than different-class digits in its hidden space.
    centroids = np.stack([h[labels[test] == c].mean(0) for c in range(10)])
    own = np.linalg.norm(h - centroids[labels[test]], axis=1).mean()
    other = np.linalg.norm(h - centroids[(labels[test] + 1) % 10], axis=1).mean()
    assert own < other


def test_evaluate_digits_on_real_digits_as_samples(tmp_path):
    """Real test digits offered as 'samples': perfect class accuracy, diversity 1 and distance 0 in both spaces."""
    from rae_cli.data import scan_image_folder

    export_digits(tmp_path / "data", size=32)
    small = {}  # a few digits per class keep the EfficientNet passes short
    for split, per_class in (("test", 6), ("train", 8)):
        full = scan_image_folder(tmp_path / "data" / split)
        for c in range(10):
            for f in [f for f, y in zip(full.files, full.labels) if y == c][:per_class]:
                dst = tmp_path / split / str(c) / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
        small[split] = tmp_path / split
    test = scan_image_folder(small["test"])
    samples = tmp_path / "samples"
    (samples / "images").mkdir(parents=True)
    for i, f in enumerate(test.files):
        (samples / "images" / f"{i:06d}.png").write_bytes(f.read_bytes())
    (samples / "sample_info.json").write_text(json.dumps({"labels": list(test.labels)}))
    m = evaluate_digits(samples, small["test"], real_train_dir=small["train"])
    assert m["sample_class_accuracy"] > 0.9
    assert m["sample_diversity_ratio"] == pytest.approx(1.0) and m["sample_diversity_ratio_digits_mlp"] == \
        pytest.approx(1.0)
    assert abs(m["frechet_distance_digits_mlp"]) < 1e-3 < m["frechet_distance_digits_mlp_real_train_vs_test"]
    assert "independent" in m["frechet_distance_digits_mlp_features"]


def test_same_size_floor_grows_as_the_sample_shrinks():
    from rae_cli.digits_eval import same_size_floor
    from rae_cli.fid import frechet_distance, statistics_from_features

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(300, 16))  # one distribution: the distance is all bias
    full = frechet_distance(*statistics_from_features(a), *statistics_from_features(b))
    assert same_size_floor(a, b, len(a)) == pytest.approx(full)  # every row drawn: the plain distance
    small, large = same_size_floor(a, b, 20), same_size_floor(a, b, 200)
    assert small > 2 * large > 0
