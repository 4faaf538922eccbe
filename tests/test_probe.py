"""``rae overfit-probe`` (Theorem 1): the two floors, the exact floor's tightness, the command end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rae_cli.cli import app
from rae_cli.config import ConfigError, resolve
from rae_cli.probe import ProbeConfig, check_train_preset, exact_floor, heads_for, paper_bound

runner = CliRunner()


# ----------------------------------------------------------------------------------------------------------------
# The floors


def test_paper_bound_values():
    assert paper_bound(768, 384) == 0.5  # DiT-S on DINOv2-B (Table 3: 0.52 measured, bound 0.5)
    assert paper_bound(1024, 384) == 0.625
    assert paper_bound(1024, 768) == 0.25
    assert paper_bound(768, 768) == 0.0
    assert paper_bound(768, 2048) == 0.0


def _best_affine_residual(points: torch.Tensor, d: int) -> float:
    """Least squares: the mean squared distance of ``points`` (M, n) to their best d-dim affine subspace."""
    centred = points - points.mean(dim=0, keepdim=True)
    eig = torch.linalg.eigvalsh(centred.T @ centred / len(points))  # ascending
    return float(eig[: max(0, points.shape[1] - d)].sum())


@pytest.mark.parametrize("d", [1, 2, 3, 4, 6, 9])
def test_exact_floor_is_the_least_squares_optimum_over_sampled_noise(d):
    """Sample many ε, pool the velocity targets ε_i − X_i of all tokens and fit the best d-dim affine subspace by
    least squares: no model with outputs in a fixed d-dim affine subspace can do better, and projecting the targets
    onto that subspace achieves it. Its residual per element must equal the closed form."""
    gen = torch.Generator().manual_seed(0)
    n, side = 6, 2  # 4 tokens: the centred data span 3 dims, so small d leaves a data residual
    latent = torch.randn(n, side, side, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    tokens = latent.reshape(n, -1).T  # (N, n)
    eps = torch.randn(100_000, *tokens.shape, generator=gen, dtype=torch.float64)
    targets = (eps - tokens).reshape(-1, n)  # pooled over samples and tokens
    sampled = _best_affine_residual(targets, d) / n
    floor = exact_floor(latent, d)
    # Monte-Carlo error of a sum of ≤ 5 unit-variance eigen-directions over 4e5 points is ~1e-3 relative.
    assert sampled == pytest.approx(floor, rel=5e-3, abs=1e-3)

    # Achievability: the predictor b + QQᵀ(y − b), with b the token mean and Q the top-d data directions (the
    # construction in exact_floor's proof), reaches the floor on the same draws.
    mean = tokens.mean(dim=0)
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=True)
    q = vh[: min(d, n)].T  # (n, d); for d > rank the extra directions are arbitrary orthonormal ones
    b = -mean
    pred = b + (targets - b) @ q @ q.T
    achieved = float(((targets - pred) ** 2).mean())
    assert achieved == pytest.approx(floor, rel=5e-3, abs=1e-3)


def test_exact_floor_versus_paper_bound():
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(32, 4, 4, generator=gen)  # n = 32, N = 16 tokens
    # With few tokens and small d the data residual is added on top of the paper's bound.
    assert exact_floor(latent, 8) > paper_bound(32, 8) + 0.05
    # From d ≥ N − 1 the centred tokens fit entirely: the floor is the paper's bound.
    for d in (15, 16, 24):
        assert exact_floor(latent, d) == pytest.approx(paper_bound(32, d), abs=1e-9)
    assert exact_floor(latent, 32) == 0.0 and exact_floor(latent, 64) == 0.0
    # A constant latent has no data residual at any width (the bias fits it).
    assert exact_floor(torch.ones(8, 3, 3), 2) == pytest.approx(0.75)
    # Decreasing in d.
    floors = [exact_floor(latent, d) for d in range(1, 40)]
    assert all(a >= b for a, b in zip(floors, floors[1:]))
    with pytest.raises(ValueError, match="one latent"):
        exact_floor(torch.ones(1, 8, 3, 3), 2)


def test_exact_floor_paper_setting():
    """256 tokens of 768 channels (DINOv2-B at 256²): the floor equals (n − d)/n for every width in Table 3."""
    latent = torch.randn(768, 16, 16, generator=torch.Generator().manual_seed(2))
    for d in (384, 768, 1024):
        assert exact_floor(latent, d) == pytest.approx(paper_bound(768, d), abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_heads_keep_rope_head_dims():
    for width in (4, 8, 12, 16, 20, 24, 32, 48, 64, 384, 768):
        for head_dim in (4, 8, 16, 64):
            h = heads_for(width, head_dim)
            assert h >= 1 and width % h == 0 and (width // h) % 4 == 0, (width, head_dim, h)
    assert heads_for(64, 8) == 8 and heads_for(8, 8) == 1 and heads_for(768, 64) == 12


def test_config_errors():
    with pytest.raises(ConfigError, match="multiples of 4"):
        resolve(ProbeConfig, preset="default", overrides=["widths=[6,16]"])
    with pytest.raises(ConfigError, match="LightningDiT"):
        resolve(ProbeConfig, preset="default", overrides=["dit.name=DiT-DH-S"])
    with pytest.raises(ConfigError, match="patch size 1"):
        resolve(ProbeConfig, preset="default", overrides=["dit.patch_size=2"])
    with pytest.raises(ConfigError, match="valid keys"):
        resolve(ProbeConfig, preset="default", overrides=["width=8"])
    cfg = resolve(ProbeConfig, preset="dinov2-b")
    assert cfg.rae.encoder == "dinov2-b" and cfg.widths == [384, 768, 1024]


def test_cli_options_write_overrides():
    result = runner.invoke(app, ["overfit-probe", "--latent-channels", "12", "--grid", "3", "--widths", "8,16",
                                 "--depths", "1,3", "--steps", "7", "--lr", "0.5", "--seed", "4", "--dry-run"])
    assert result.exit_code == 0, result.output
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(result.stdout)
    assert (cfg.latent_channels, cfg.grid, list(cfg.widths), list(cfg.depths), cfg.steps, cfg.lr, cfg.seed) == \
        (12, 3, [8, 16], [1, 3], 7, 0.5, 4)
    bad = runner.invoke(app, ["overfit-probe", "--widths", "8,x", "--out", "x"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output


# ----------------------------------------------------------------------------------------------------------------
# End to end


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_probe_reaches_the_floors_fast(tmp_path):
    """A small version of `--latent-channels 32 --grid 4 --widths 8,16,32,64 --steps 1500`: n = 16 channels on 2×2
    tokens; d = 8 < n stays at its floor 0.5, d = 32 ≥ n overfits."""
    out = tmp_path / "probe"
    result = runner.invoke(app, ["overfit-probe", "--latent-channels", "16", "--grid", "2", "--widths", "8,32",
                                 "--depth", "2", "--steps", "600", "--lr", "0.02", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "probe.csv") as f:
        assert f.readline().strip() == "width,depth,latent_dim,final_loss,bound,exact_bound"
    rows = {int(r["width"]): {k: float(v) for k, v in r.items()} for r in _rows(out / "probe.csv")}
    assert set(rows) == {8, 32}
    for r in rows.values():
        assert r["final_loss"] >= r["exact_bound"] - 0.01  # nothing beats the floor
        assert r["latent_dim"] == 16 and r["depth"] == 2
    assert rows[8]["bound"] == 0.5 and rows[8]["exact_bound"] == pytest.approx(0.5)  # d ≥ N − 1 = 3
    assert abs(rows[8]["final_loss"] - 0.5) < 0.1
    assert rows[32]["final_loss"] * 10 <= rows[8]["final_loss"]
    info = json.loads((out / "probe.json").read_text())
    verdicts = {r["width"]: r["verdict"] for r in info["rows"]}
    assert verdicts[8].startswith("cannot fit") and verdicts[32] == "fits"
    assert info["latent"]["shape"] == [16, 2, 2]
    assert "cannot fit" in result.output and "fits" in result.output
    png = (out / "probe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "config.yaml").is_file()


def test_probe_on_an_image_latent(tmp_path):
    """Image mode with the tiny random-init RAE: the latent comes from the encoder (32 channels, 4×4 tokens)."""
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    grad = np.linspace(0, 255, 40 * 40 * 3).reshape(40, 40, 3).astype(np.uint8)
    Image.fromarray(grad).save(img)
    out = tmp_path / "probe"
    result = runner.invoke(app, ["overfit-probe", "--image", str(img), "--widths", "8", "--steps", "3",
                                 "--out", str(out), "rae=tiny", "eval_samples=64"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "probe.json").read_text())
    assert info["latent"]["shape"] == [32, 4, 4] and str(img) in info["latent"]["source"]
    (row,) = info["rows"]
    assert row["bound"] == 0.75 and row["exact_bound"] >= 0.75 and math.isfinite(row["final_loss"])


def test_missing_image_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["overfit-probe", "--image", str(tmp_path / "nope.png"), "--widths", "8",
                                 "--steps", "1", "--out", str(tmp_path / "o"), "rae=tiny"])
    assert result.exit_code == 2 and "nope.png" in result.output


# ----------------------------------------------------------------------------------------------------------------
# --check-preset


def test_check_preset_paper_recipe():
    check = check_train_preset("dit-dh-xl_dinov2-b_in256")
    assert (check.latent_channels, check.tokens, check.width, check.bound, check.ok) == (768, 256, 2048, 0.0, True)
    result = runner.invoke(app, ["overfit-probe", "--check-preset", "dit-dh-xl_dinov2-b_in256"])
    assert result.exit_code == 0 and "768" in result.output and "2048" in result.output


def test_check_preset_too_narrow(tmp_path):
    preset = tmp_path / "narrow.yaml"
    preset.write_text("rae: tiny\ndit:\n  name: DiT-S\n  hidden_size: 16\n  depth: 2\n  num_heads: 2\n")
    check = check_train_preset(str(preset))
    assert (check.latent_channels, check.tokens, check.width, check.bound, check.ok) == (32, 16, 16, 0.5, False)
    result = runner.invoke(app, ["overfit-probe", "--check-preset", str(preset)])
    assert result.exit_code == 1 and "0.500" in result.output
    missing = runner.invoke(app, ["overfit-probe", "--check-preset", "no-such-preset"])
    assert missing.exit_code == 2 and "no-such-preset" in missing.output
