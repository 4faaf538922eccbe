"""The quickstart chain (examples/quickstart.sh) in its reduced CI form: every stage runs, writes its outputs, and
its numbers stay above thresholds taken from a measured run of the same reduced chain.

The full run (README's first command) trains for minutes; the CI form trains the decoder 6 epochs and the DiT 16 (704
steps of 32) and samples 50 images with 20 steps — enough that class conditioning shows (accuracy above chance) and
a broken stage moves the numbers far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_chain_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, QUICKSTART_SCALE="ci", RAE_SKIP_INSTALL="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh"), str(out)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("reconstruction_psnr", "frechet_distance", "sample_class_accuracy",
                "frechet_distance_real_train_vs_test"):
        assert np.isfinite(m[key]), key
    assert 0.0 <= m["sample_class_accuracy"] <= 1.0 and m["num_samples"] == 50
    # Thresholds from a measured run of this reduced chain (2026-12-03, 2 CPU cores, torch 2.14.1): PSNR 21.5 dB,
    # class accuracy 0.26 (chance: 0.10), Fréchet distance 545 (EfficientNet-Lite0; 50 real digits score ≈ 133),
    # judge-MLP Fréchet distance 4.3. The margins absorb thread-count rounding; a stage that stops learning (a
    # DiT of 8 epochs measured 0.10 and 811, a decoder of 1 epoch 10.4 dB) fails them.
    for key, bound in (("reconstruction_psnr", 19.0), ("sample_class_accuracy", 0.15)):
        assert m[key] >= bound, (key, m[key], bound)
    for key, bound in (("frechet_distance", 700.0), ("frechet_distance_digits_mlp", 8.0)):
        assert m[key] <= bound, (key, m[key], bound)
    assert "not FID" in m["frechet_distance_features"]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"train-decoder", "cache-latents", "train-dit", "sample", "evaluate", "total"}
    grid = Image.open(out / "samples_by_class.png")
    recon = Image.open(out / "recon_grid.png")
    assert grid.size[1] > 0 and recon.size[0] > recon.size[1]
    # The decoder was trained with L1 only (no LPIPS/GAN weights offline) and exported where recon found it.
    assert (out / "decoder" / "export" / "decoder.safetensors").is_file()
    assert "sample_class_accuracy" in res.stdout


def test_digit_classifier_and_class_grid():
    """The judge of the quickstart: a scikit-learn classifier that reads our 32² PNG digits correctly."""
    from rae_cli.digits_eval import class_grid
    from rae_cli.toy_data import (fit_digit_classifier, load_digits_arrays, split_indices, to_digit_features,
                                  upsample)

    images, labels = load_digits_arrays()
    _, test = split_indices(labels, 0.2, 0)
    clf = fit_digit_classifier()
    acc = (clf.predict(to_digit_features(upsample(images[test], 32))) == labels[test]).mean()
    assert acc > 0.9  # held-out real digits through the 32² round trip
    grid = class_grid(upsample(images[:20], 8), labels[:20], 10, per_class=2)
    assert grid.shape == (10 * 10 + 2, 2 * 10 + 2, 3)
    # Row c holds class c: the first cell of row labels[0] is image 0.
    c = int(labels[0])
    np.testing.assert_array_equal(grid[2 + c * 10:2 + c * 10 + 8, 2:10], upsample(images[:1], 8)[0])


def test_split_is_stratified_and_disjoint():
    from rae_cli.toy_data import load_digits_arrays, split_indices

    _, labels = load_digits_arrays()
    train, test = split_indices(labels, 0.2, 0)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    for c in range(10):
        frac = (labels[test] == c).sum() / (labels == c).sum()
        assert abs(frac - 0.2) < 0.02
