"""ADM-format npz and image-folder I/O (rae_cli.npz)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from rae_cli.errors import DataError
from rae_cli.npz import (ReferenceStats, count_images, has_images, iter_image_batches, load_images_array,
                         load_reference, read_stats, save_image_folder, save_npz, save_reference_stats, to_uint8)


def _arr(n: int = 5, h: int = 8, w: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ to_uint8


def test_to_uint8_clamps_scales_and_truncates():
    values = torch.tensor([-0.5, 0.0, 0.5, 0.999, 1.0, 1.5, 2 / 255, 2.9 / 255])
    x = values.view(1, 1, 1, -1).expand(1, 3, 1, -1)  # (1, 3, 1, 8)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 3)
    # 0.5·255 = 127.5 → 127 and 0.999·255 = 254.7 → 254: truncation, like the official sampler
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 2, 2]


def test_to_uint8_is_channels_last_and_accepts_single_images():
    x = torch.zeros(3, 4, 5)
    x[0], x[1], x[2] = 1.0, 0.5, 0.0
    out = to_uint8(x)
    assert out.shape == (4, 5, 3)
    assert out[0, 0].tolist() == [255, 127, 0]
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_uint8(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError):
        to_uint8(np.zeros((1, 3, 4, 4)))


# ------------------------------------------------------------------------------------------ npz


def test_save_npz_round_trip_under_arr_0(tmp_path):
    arr = _arr()
    path = save_npz(tmp_path / "samples.npz", arr)
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left behind
    np.testing.assert_array_equal(load_images_array(path), arr)
    assert count_images(path) == 5 and has_images(path)


def test_save_npz_rejects_non_uint8_nhwc_and_keeps_the_old_file(tmp_path):
    path = save_npz(tmp_path / "s.npz", _arr())
    before = path.read_bytes()
    with pytest.raises(DataError, match="uint8"):
        save_npz(path, _arr().astype(np.float32))
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        save_npz(path, _arr().transpose(0, 3, 1, 2).copy())
    assert path.read_bytes() == before


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_in_batches(tmp_path, compressed):
    arr = _arr(n=11)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=arr)
    batches = list(iter_image_batches(path, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), arr)


def test_npz_with_wrong_content_gives_clear_errors(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_images_array(tmp_path / "float.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(DataError, match="statistics only"):
        load_images_array(tmp_path / "stats.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_images_array(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="not found"):
        load_images_array(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------ folders


def test_folder_is_read_recursively_sorted_as_rgb(tmp_path):
    arr = _arr(n=4)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    Image.fromarray(arr[0]).save(tmp_path / "a" / "deep" / "1.png")
    Image.fromarray(arr[1]).save(tmp_path / "a" / "2.png")
    Image.fromarray(arr[2]).convert("RGBA").save(tmp_path / "b" / "0.png")  # RGBA → RGB
    Image.fromarray(arr[3][..., 0]).save(tmp_path / "c.png")  # grayscale → RGB, 3 equal channels
    (tmp_path / "notes.txt").write_text("not an image")
    out = load_images_array(tmp_path)
    assert out.dtype == np.uint8 and out.shape == (4, 8, 6, 3)
    np.testing.assert_array_equal(out[0], arr[1])  # sorted paths: a/2.png < a/deep/1.png < b/0.png < c.png
    np.testing.assert_array_equal(out[1], arr[0])
    np.testing.assert_array_equal(out[2], arr[2])
    np.testing.assert_array_equal(out[3], np.repeat(arr[3][..., :1], 3, axis=-1))
    assert count_images(tmp_path) == 4 and has_images(tmp_path)


def test_save_image_folder_round_trip_with_official_names(tmp_path):
    arr = _arr(n=3)
    paths = save_image_folder(arr, tmp_path / "out", start_index=7)
    assert [p.name for p in paths] == ["000007.png", "000008.png", "000009.png"]
    np.testing.assert_array_equal(load_images_array(tmp_path / "out"), arr)


def test_corrupt_image_is_named(tmp_path):
    save_image_folder(_arr(n=2), tmp_path)
    (tmp_path / "000001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="000001.png"):
        load_images_array(tmp_path)


def test_mixed_sizes_and_empty_folders_are_errors(tmp_path):
    save_image_folder(_arr(n=1), tmp_path / "mixed")
    Image.fromarray(_arr(n=1, h=9)[0]).save(tmp_path / "mixed" / "000001.png")
    with pytest.raises(DataError, match="same size"):
        load_images_array(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_images_array(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ references


def test_load_reference_returns_adm_statistics(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=4), rng.normal(size=(4, 4))
    sigma = a @ a.T
    # an ADM reference batch: images for the other metrics, plus train-set statistics (and sFID ones we ignore)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=_arr(), mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    ref = load_reference(tmp_path / "VIRTUAL_ref.npz")
    assert isinstance(ref, ReferenceStats)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.features is None and ref.num_images is None and ref.extractor is None
    assert has_images(tmp_path / "VIRTUAL_ref.npz")


def test_load_reference_returns_images_without_statistics(tmp_path):
    arr = _arr()
    save_npz(tmp_path / "val.npz", arr)
    np.testing.assert_array_equal(load_reference(tmp_path / "val.npz"), arr)
    save_image_folder(arr, tmp_path / "folder")
    np.testing.assert_array_equal(load_reference(tmp_path / "folder"), arr)
    with pytest.raises(DataError, match="not found"):
        load_reference(tmp_path / "nope")


def test_reference_stats_round_trip_without_pickle(tmp_path):
    feats = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    stats = ReferenceStats(mu=feats.mean(0).astype(np.float64), sigma=np.cov(feats.astype(np.float64), rowvar=False),
                           features=feats, num_images=6, extractor="some-net")
    path = save_reference_stats(tmp_path / "stats.npz", stats)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["extractor.npy", "features.npy", "mu.npy", "num_images.npy", "sigma.npy"]
    back = read_stats(path)  # read with allow_pickle=False
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, feats)
    assert back.num_images == 6 and back.extractor == "some-net"
    assert not has_images(path)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(DataError, match="sigma"):
        read_stats(tmp_path / "bad.npz")
