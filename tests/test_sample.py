"""``rae sample`` / ``rae convert-dit``: official stage-2 files, seeds per image, labels, guidance NFE, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rae_cli.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"rae {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}"
                             f"\n{result.exception!r}")
    return result


# ------------------------------------------------------------------------------------------------ helpers


def dit_section(model_config: dict) -> dict:
    """Our DiT section for an official DiTwDDTHead config (the parity files' ``model_config``)."""
    return {"name": "DiT-DH-S", "hidden_size": model_config["hidden_size"], "depth": model_config["depth"],
            "num_heads": model_config["num_heads"], "patch_size": model_config["patch_size"],
            "mlp_ratio": model_config["mlp_ratio"], "class_dropout_prob": model_config["class_dropout_prob"]}


def make_stage2_pt(path: Path, model_config: dict, *, in_channels: int | None = None, input_size: int | None = None,
                   seed: int = 0, wrap: str | None = None) -> Path:
    """An official-format stage-2 file (``torch.save`` of a state dict, optionally wrapped) with perturbed weights,
    so that adaLN-zero does not make every output 0."""
    from rae_cli.dit import build_dit

    dit = dit_section(model_config)
    torch.manual_seed(seed)
    model = build_dit("DiT-DH-S", input_size=input_size or model_config["input_size"],
                      in_channels=in_channels or model_config["in_channels"],
                      num_classes=model_config["num_classes"], patch_size=dit["patch_size"],
                      hidden_size=dit["hidden_size"], depth=dit["depth"], num_heads=dit["num_heads"],
                      mlp_ratio=dit["mlp_ratio"], class_dropout_prob=dit["class_dropout_prob"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.y_embedder.embedding_table.weight.add_(torch.randn(model.y_embedder.embedding_table.weight.shape,
                                                                 generator=g))
    sd = model.state_dict()
    obj = sd if wrap is None else {"ema": sd} if wrap == "ema" else {
        "step": 10, "epoch": 1, "model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "optimizer": {}}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def official(parity):
    """Paths and settings of the official tiny files (``official_format/``) and the transport fixture."""
    root = parity.root / "official_format"
    tensors, meta = parity("transport")
    _, rae_meta = parity("rae_encode")
    params = rae_meta["rae_params"]
    rae = {"encoder": "dinov2-b", "encoder_source": str(root / "tiny-dinov2-with-registers"),
           "encoder_input_size": params["encoder_input_size"], "decoder": str(root / "tiny-decoder-config"),
           "decoder_patch_size": params["decoder_patch_size"], "decoder_weights": str(root / "tiny_decoder_model.pt"),
           "stats": str(root / "tiny_stat.pt"), "noise_tau": 0.0}
    return {"root": root, "stage2": root / "tiny_stage2_model.pt", "model_config": meta["model_config"],
            "transport": tensors, "transport_meta": meta, "rae": rae}


# An inline tiny DiT-DH (official DiTwDDTHead flags) for the tests that need no official outputs.
TINY_MODEL_CONFIG = {"input_size": 4, "patch_size": 1, "in_channels": 32, "hidden_size": [32, 48], "depth": [1, 1],
                     "num_heads": [2, 2], "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 10}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One of our checkpoint folders (train-dit layout) for the tiny rae preset, with a perturbed DiT-DH."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig

    root = tmp_path_factory.mktemp("tiny_run")
    mc = dict(TINY_MODEL_CONFIG)
    pt = make_stage2_pt(root / "src.pt", mc, seed=3)
    folder = root / "checkpoints" / "step-000000010"
    folder.mkdir(parents=True)
    sd = torch.load(pt, weights_only=True)
    from rae_cli.checkpoint import save_safetensors

    save_safetensors(folder / "ema.safetensors", sd)
    save_safetensors(folder / "model.safetensors", {k: torch.zeros_like(v) for k, v in sd.items()})
    config = {"rae": asdict(resolve(RAEConfig, preset="tiny")), "dit": dit_section(mc),
              "flow": {"shift": 1.0}, "latent_shape": [32, 4, 4], "num_classes": mc["num_classes"]}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (folder / "meta.json").write_text(json.dumps({"step": 10}))
    return root


@pytest.fixture(scope="module")
def guide_pt(tmp_path_factory):
    mc = dict(TINY_MODEL_CONFIG, hidden_size=[16, 32])
    return make_stage2_pt(tmp_path_factory.mktemp("guide") / "guide.pt", mc, seed=7), mc


def sample_cfg(*overrides: str, preset: str | None = None):
    from rae_cli.sample import resolve_sample_config

    return resolve_sample_config(preset, list(overrides))[1]


def load_npz(path: Path) -> np.ndarray:
    with np.load(path) as f:
        assert list(f.files) == ["arr_0"]
        return f["arr_0"]


# ------------------------------------------------------------------------------------------------ official files


def test_official_stage2_sampling_parity(official):
    """The official tiny stage-2 .pt loaded from command-line settings alone, integrated by `rae sample`'s own
    path (Euler, 50 points, shift √48, with and without CFG 3) matches the official sampler."""
    from rae_cli.sample import prepare

    t = official["transport"]
    shift = float(str(official["transport_meta"]["time_dist_shift"]).split("=")[-1])  # the sampling shift
    B = len(t["sample.y"])
    common = [f"checkpoint={official['stage2']}", f"dit={json.dumps(dit_section(official['model_config']))}",
              "decode=false", f"flow.shift={shift!r}", "num_steps=50"]
    for extra, key, rows in (([], "sample.euler_50.final", 49 * B),
                             (["guidance.method=cfg", "guidance.scale=3.0"], "sample.euler_50_cfg3.final",
                              49 * 2 * B)):
        sampling, rae, stage2 = prepare(sample_cfg(*common, *extra))
        assert rae is None and stage2.latent_shape == (official["model_config"]["in_channels"],) + (
            official["model_config"]["input_size"],) * 2  # read off the weights
        with torch.no_grad():
            out = sampling.integrate(t["sample.z"], t["sample.y"])
        torch.testing.assert_close(out, t[key], atol=1e-5, rtol=0)
        assert sampling.model.calls == 49 and sampling.model.samples == rows  # CFG: one forward of [x; x]


@pytest.mark.parametrize("wrap", ["ema", "training"])
def test_official_checkpoint_wrappers_load_the_ema_parity(tmp_path, official, wrap):
    """{'ema': sd} and training checkpoints {'model', 'ema', ...} load strictly, EMA preferred; bad keys fail."""
    from rae_cli.checkpoint import CheckpointError
    from rae_cli.stage2_loading import build_stage2

    sd = torch.load(official["stage2"], weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"ema": sd} if wrap == "ema" else {"step": 1, "model": {k: v * 0 for k, v in sd.items()},
                                                   "ema": sd, "optimizer": {}}, path)
    dit = dit_section(official["model_config"])
    loaded = build_stage2(str(path), dit)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert loaded.num_classes == official["model_config"]["num_classes"]

    torch.save({**sd, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unexpected keys: extra.weight"):
        build_stage2(str(path), dit)
    with pytest.raises(Exception, match="architecture"):  # official files carry no config
        build_stage2(str(official["stage2"]), None)


def test_sample_cli_from_official_stage2_file_parity(tmp_path, official):
    """`rae sample` on the official tiny stage-2 .pt with overrides only; its (8, 4, 4) latents fit no official
    decoder (the tiny RAE decodes 32 channels), so this run keeps the latents (decode=false)."""
    from rae_cli.sample import class_labels, image_noise, prepare

    out = tmp_path / "s"
    args = [f"checkpoint={official['stage2']}", f"dit={json.dumps(dit_section(official['model_config']))}",
            "decode=false", "num_images=5", "num_steps=4", "batch_size=2", "device=cpu"]
    invoke("sample", "--out", out, *args)
    from safetensors.torch import load_file

    saved = load_file(out / "latents.safetensors")
    mc = official["model_config"]
    assert saved["latents"].shape == (5, mc["in_channels"], mc["input_size"], mc["input_size"])
    labels = class_labels(5, mc["num_classes"], 0)
    assert saved["labels"].tolist() == labels.tolist()
    sampling, _, _ = prepare(sample_cfg(*args))
    with torch.no_grad():
        expect = sampling.integrate(image_noise(list(range(5)), sampling.latent_shape, 0), labels)
    torch.testing.assert_close(saved["latents"], expect, atol=1e-6, rtol=0)
    info = json.loads((out / "sample_info.json").read_text())
    assert info["network_evaluations_per_image"] == {"main": 3.0, "guide": 0.0}  # 4 points = 3 Euler steps
    assert info["time_grid"][0] == 1.0 and info["time_grid"][-1] > 0  # stops at shift(0.001), as official


def test_sample_end_to_end_with_official_decoder_parity(tmp_path, official, parity):
    """Stage-2 .pt (official format, 32-channel latents) + official tiny encoder/decoder/stats → PNGs, npz, grid.

    The npz equals uint8(clamp(decode(latents))) of the latents that a decode=false run with the same seed makes,
    and the decoder built from these settings reproduces the official decode (parity)."""
    from rae_cli.build import build_rae
    from rae_cli.npz import to_uint8

    stats = torch.load(official["root"] / "tiny_stat.pt", weights_only=True)
    c, h, _ = stats["mean"].shape
    pt = make_stage2_pt(tmp_path / "stage2.pt", official["model_config"], in_channels=c, input_size=h, seed=11)
    args = [f"checkpoint={pt}", f"dit={json.dumps(dit_section(official['model_config']))}",
            f"rae={json.dumps(official['rae'])}", "num_images=4", "num_steps=5", "batch_size=4", "device=cpu",
            "label_sampling=random"]
    invoke("sample", "--out", tmp_path / "img", *args)
    invoke("sample", "--out", tmp_path / "lat", *args, "decode=false")

    images = load_npz(tmp_path / "img" / "samples.npz")
    side = official["rae"]["decoder_patch_size"] * h
    assert images.shape == (4, side, side, 3) and images.dtype == np.uint8
    assert sorted(p.name for p in (tmp_path / "img" / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert (tmp_path / "img" / "grid.png").is_file()
    assert images.std() > 0 and not np.array_equal(images[0], images[1])

    cfg = sample_cfg(*args)
    rae = build_rae(cfg.rae).eval()
    from safetensors.torch import load_file

    latents = load_file(tmp_path / "lat" / "latents.safetensors")["latents"]
    with torch.no_grad():
        np.testing.assert_array_equal(images, to_uint8(rae.decode(latents).clamp(0, 1)))
    enc, _ = parity("rae_encode")
    with torch.no_grad():
        torch.testing.assert_close(rae.decode(enc["output.z"]), enc["output.decode_of_z"], atol=1e-5, rtol=0)


def test_convert_dit_then_sample_from_folder_parity(tmp_path, official):
    """`rae convert-dit` writes model.safetensors + config.yaml; sampling from the folder = from the .pt."""
    dit = json.dumps(dit_section(official["model_config"]))
    invoke("convert-dit", "--out", tmp_path / "conv", f"checkpoint={official['stage2']}", f"dit={dit}")
    assert {p.name for p in (tmp_path / "conv").iterdir()} == {"model.safetensors", "config.yaml"}
    common = ["decode=false", "num_images=3", "num_steps=3", "device=cpu"]
    invoke("sample", "--out", tmp_path / "a", f"checkpoint={official['stage2']}", f"dit={dit}", *common)
    invoke("sample", "--out", tmp_path / "b", f"checkpoint={tmp_path / 'conv'}", *common)  # no dit: from config
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "latents.safetensors"), load_file(tmp_path / "b" / "latents.safetensors")
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])


# ------------------------------------------------------------------------------------------------ our folders


def test_checkpoint_folder_settings_beat_the_preset(tiny_run):
    """-p tiny checkpoint=RUN: the run's dit/rae/flow/latent_shape replace the preset's; overrides still win."""
    r = invoke("sample", "-p", "tiny", "--out", "unused", f"checkpoint={tiny_run}", "rae.decoder_patch_size=16",
               "--dry-run")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(r.stdout)
    assert list(cfg.dit.hidden_size) == [32, 48] and cfg.flow.shift == 1.0 and list(cfg.latent_shape) == [32, 4, 4]
    assert cfg.rae.decoder_patch_size == 16 and cfg.checkpoint == str(tiny_run)
    assert cfg.num_images == 8  # from the preset


def test_same_images_for_any_batch_size_and_resume(tmp_path, tiny_run):
    """One seed per image: batch sizes 1 and 3 give the same npz; deleting PNGs and re-running restores it."""
    common = ["-p", "tiny", f"checkpoint={tiny_run}", "num_images=5", "num_steps=4", "guidance.method=cfg",
              "guidance.scale=2.0", "guidance.t_max=0.6"]
    invoke("sample", "--out", tmp_path / "b1", *common, "batch_size=1")
    invoke("sample", "--out", tmp_path / "b3", *common, "batch_size=3")
    a, b = load_npz(tmp_path / "b1" / "samples.npz"), load_npz(tmp_path / "b3" / "samples.npz")
    assert a.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(a, b)

    for i in (1, 4):
        (tmp_path / "b3" / "images" / f"{i:06d}.png").unlink()
    (tmp_path / "b3" / "samples.npz").unlink()
    invoke("sample", "--out", tmp_path / "b3", *common, "batch_size=2")  # batch size may change on resume
    info = json.loads((tmp_path / "b3" / "sample_info.json").read_text())
    assert info["generated_this_run"] == 2
    np.testing.assert_array_equal(load_npz(tmp_path / "b3" / "samples.npz"), a)

    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "b3"), *common, "seed=1"])
    assert r.exit_code == 2 and "different settings (seed)" in r.output


def test_decoder_upsampling_with_twice_the_patch(tmp_path, tiny_run):
    """rae.decoder_patch_size=16 turns the tiny 4×4 latents into 64² images (the 256 → 512 trick)."""
    invoke("sample", "-p", "tiny", "--out", tmp_path, f"checkpoint={tiny_run}", "rae.decoder_patch_size=16",
           "num_images=2", "num_steps=3", "grid_images=2")
    assert load_npz(tmp_path / "samples.npz").shape == (2, 64, 64, 3)


def test_autoguidance_and_cfg_spend_no_wasted_evaluations(tmp_path, tiny_run, guide_pt):
    """AG: one main and one guide pass per step and image inside the interval, no doubled batch; CFG: one
    unconditional row per image only where t is inside [t_min, t_max]; Heun: 2 per step."""
    from rae_cli.sample import sample
    from rae_cli.samplers import time_grid

    guide, mc = guide_pt
    steps, n = 6, 3
    ag = [f"checkpoint={tiny_run}", f"num_images={n}", f"num_steps={steps}", "batch_size=2", "decode=false",
          "guidance.method=autoguidance", "guidance.scale=1.5", f"guidance.guide_checkpoint={guide}",
          f"guidance.guide_dit={json.dumps(dit_section(mc))}"]
    s = sample(sample_cfg(*ag, "guidance.t_max=1.0"), tmp_path / "ag")
    assert s.nfe_per_image == {"main": steps - 1, "guide": steps - 1}

    grid = time_grid(steps, shift=1.0)[:-1]  # the times the network sees (tiny_run: flow.shift = 1)
    inside = int(((grid >= 0.0) & (grid <= 0.5)).sum())
    assert 0 < inside < steps - 1
    s = sample(sample_cfg(*ag, "guidance.t_max=0.5"), tmp_path / "ag_interval")
    assert s.nfe_per_image == {"main": steps - 1, "guide": inside}

    cfg = [f"checkpoint={tiny_run}", f"num_images={n}", f"num_steps={steps}", "decode=false",
           "guidance.method=cfg", "guidance.scale=3.0", "guidance.t_max=0.5"]
    s = sample(sample_cfg(*cfg), tmp_path / "cfg")
    assert s.nfe_per_image == {"main": steps - 1 + inside, "guide": 0}
    s = sample(sample_cfg(*cfg, "guidance.scale=1.0", "method=heun"), tmp_path / "heun")
    assert s.nfe_per_image == {"main": 2 * (steps - 1), "guide": 0}


def test_sde_images_do_not_depend_on_batch_size(tmp_path, tiny_run):
    from rae_cli.sample import sample

    common = [f"checkpoint={tiny_run}", "num_images=3", "num_steps=4", "decode=false", "method=sde"]
    sample(sample_cfg(*common, "batch_size=1"), tmp_path / "a")
    sample(sample_cfg(*common, "batch_size=3"), tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "latents.safetensors"), load_file(tmp_path / "b" / "latents.safetensors")
    torch.testing.assert_close(a["latents"], b["latents"], atol=1e-6, rtol=0)
    assert torch.isfinite(a["latents"]).all()


# ------------------------------------------------------------------------------------------------ labels, config


def test_labels_explicit_balanced_random():
    from rae_cli.sample import class_labels

    assert class_labels(5, 10, 0, explicit=[3, 7]).tolist() == [3, 7, 3, 7, 3]
    bal = class_labels(40, 10, 0, "balanced")
    assert torch.bincount(bal, minlength=10).tolist() == [4] * 10
    assert bal.tolist() != sorted(bal.tolist())  # shuffled
    assert torch.bincount(class_labels(23, 10, 0, "balanced"), minlength=10).min() == 2  # ⌊23/10⌋ or ⌈23/10⌉
    rnd = class_labels(30, 10, 0, "random")
    assert class_labels(12, 10, 0, "random").tolist() == rnd[:12].tolist()  # image i's label ignores N
    assert class_labels(30, 10, 1, "random").tolist() != rnd.tolist()
    with pytest.raises(Exception, match="outside"):
        class_labels(3, 10, 0, explicit=[10])


def test_presets_resolve_and_point_at_released_weights():
    import math

    from rae_cli.config import list_presets
    from rae_cli.flow import shift_from_shape

    assert {"tiny", "dit-dh-xl_in256", "dit-dh-xl_in256_ag", "dit-dh-xl_in512", "dit-dh-xl_in512_ag"} <= set(
        list_presets("sample"))
    from rae_cli import weights

    ag = sample_cfg(preset="dit-dh-xl_in256_ag")
    assert (ag.guidance.method, ag.guidance.scale, ag.guidance.guide_checkpoint) == ("autoguidance", 1.42,
                                                                                     "ditdh-s-guide-256")
    assert ag.dit.name == "DiT-DH-XL" and ag.guidance.guide_dit.name == "DiT-DH-S" and ag.num_steps == 50
    ag512 = sample_cfg(preset="dit-dh-xl_in512_ag")
    assert (ag512.guidance.scale, ag512.guidance.guide_checkpoint, ag512.rae.encoder_input_size) == (
        1.5, "ditdh-s-guide-512", 448)
    assert math.isclose(ag512.flow.resolved_shift([768, 32, 32]) if ag512.flow else
                        shift_from_shape([768, 32, 32]), math.sqrt(786432 / 4096))
    for name in ("dit-dh-xl_in256", "dit-dh-xl_in256_ag", "dit-dh-xl_in512", "dit-dh-xl_in512_ag"):
        cfg = sample_cfg(preset=name)
        for artifact in (cfg.checkpoint, cfg.guidance.guide_checkpoint, cfg.rae.decoder_weights, cfg.rae.stats):
            if artifact:
                weights.get_artifact(artifact)  # a registered released file


def test_bad_settings_fail_clearly(tmp_path):
    stage2 = make_stage2_pt(tmp_path / "official-format.pt", TINY_MODEL_CONFIG)  # a raw state dict, as released
    r = runner.invoke(app, ["sample", "--out", str(tmp_path), "method=rk45"])
    assert r.exit_code == 2 and "euler, heun, sde" in r.output
    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "x"), "-p", "tiny"])
    assert r.exit_code == 2 and "checkpoint=" in r.output
    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "y"), f"checkpoint={stage2}",
                            "decode=false"])  # an official file: its architecture must be named
    assert r.exit_code == 2 and "name its architecture" in r.output
    wrong = dict(dit_section(TINY_MODEL_CONFIG), hidden_size=[16, 64])
    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "z"), f"checkpoint={stage2}",
                            f"dit={json.dumps(wrong)}", "decode=false"])
    assert r.exit_code == 2 and "wrong shape" in r.output


def test_throughput_benchmark_reports_speed_and_evaluations(capsys):
    """benchmarks/sample_throughput.py on the tiny preset with random weights: one JSON line per guidance mode."""
    import importlib.util

    from parity_fixtures import REPO

    spec = importlib.util.spec_from_file_location("sample_throughput", REPO / "benchmarks" / "sample_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["-p", "tiny", "--random-init", "--images", "4", "--guidance", "none,autoguidance",
                "latent_shape=[32,4,4]", "num_steps=4", "batch_size=2"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["guidance"] for x in lines] == ["none", "autoguidance"]
    assert lines[0]["network_evaluations_per_image"] == {"main": 3.0, "guide": 0.0}
    assert lines[1]["network_evaluations_per_image"] == {"main": 3.0, "guide": 3.0}
    assert all(x["images_per_second"] > 0 and x["images"] == 4 for x in lines)


def test_sample_from_a_train_dit_run(tmp_path):
    """A real `rae train-dit` run folder (tiny, 2 steps) samples with no other settings: its config.yaml supplies
    the autoencoder (with the cache's statistics), the architecture, the shift and the classes."""
    from dit_training_helpers import synthetic_cache

    cache = synthetic_cache(tmp_path / "cache", n=8, classes=3)
    invoke("train-dit", "-p", "tiny", "--cache", cache, "--out", tmp_path / "run", "max_steps=2")
    invoke("sample", "--out", tmp_path / "s", f"checkpoint={tmp_path / 'run'}", "num_images=3", "num_steps=3",
           "device=cpu")
    assert load_npz(tmp_path / "s" / "samples.npz").shape == (3, 32, 32, 3)
    info = json.loads((tmp_path / "s" / "sample_info.json").read_text())
    assert max(info["labels"]) < 3 and info["shift"] == 1.0 and "step-000000002" in info["source"]


def test_packed_latents_are_streamed_into_a_valid_safetensors_file(tmp_path):
    """decode=false packing writes the same tensors as stacking every per-image file, without stacking them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rae_cli.checkpoint import save_safetensors
    from rae_cli.sample import _pack_latents, latent_path

    zs = [torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for i, z in enumerate(zs):
        save_safetensors(latent_path(tmp_path, i), {"latent": z}, {"label": 10 + i})
    out = _pack_latents(tmp_path, 5)
    packed = load_file(out)
    assert torch.equal(packed["latents"], torch.stack(zs))
    assert packed["labels"].tolist() == [10, 11, 12, 13, 14] and packed["labels"].dtype == torch.int64
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["normalized"] == "true"
