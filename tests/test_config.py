"""The config system: presets, sub-presets, overrides, unknown keys, validation, saving; every shipped preset loads."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rae_cli.config import (ConfigError, list_presets, load_resolved, preset_path, resolve, save_resolved, to_dict)
from rae_cli.schema import EncodeConfig, FlowConfig, RAEConfig


def test_defaults_then_preset_then_overrides():
    cfg = resolve(EncodeConfig, base={"rae": "tiny"}, overrides=["rae.noise_tau=0.5", "batch_size=3"])
    assert cfg.rae.encoder_random_init is True  # from presets/rae/tiny.yaml
    assert cfg.rae.decoder_patch_size == 8
    assert cfg.rae.noise_tau == 0.5  # override wins over the preset
    assert cfg.batch_size == 3
    assert cfg.dtype == "fp32"  # schema default


def test_string_section_override_loads_sub_preset():
    cfg = resolve(EncodeConfig, overrides=["rae=mae-b"])
    assert cfg.rae.encoder == "mae-b" and cfg.rae.encoder_input_size == 256


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as e:
        resolve(EncodeConfig, overrides=["rae.noise_taux=0.1"])
    msg = str(e.value)
    assert "rae.noise_taux" in msg and "noise_tau" in msg and "decoder_patch_size" in msg
    with pytest.raises(ConfigError, match="valid keys: batch_size"):
        resolve(EncodeConfig, overrides=["bogus=1"])


def test_unknown_key_in_preset_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("encoder: dinov2-b\nnot_a_key: 3\n")
    with pytest.raises(ConfigError, match="not_a_key"):
        resolve(RAEConfig, preset=str(p))


def test_bad_values_are_errors():
    with pytest.raises(ConfigError):
        resolve(EncodeConfig, overrides=["batch_size=abc"])
    with pytest.raises(ConfigError, match="dtype"):
        resolve(EncodeConfig, overrides=["dtype=fp8"])
    with pytest.raises(ConfigError, match="time_dist"):
        resolve(FlowConfig, overrides=["time_dist=gamma"])
    with pytest.raises(ConfigError, match="decoder_depth"):
        resolve(RAEConfig, overrides=["decoder=custom", "decoder_hidden_size=8"])
    with pytest.raises(ConfigError, match="key=value"):
        resolve(EncodeConfig, overrides=["batch_size"])


def test_unknown_preset_lists_shipped_ones():
    with pytest.raises(ConfigError, match="tiny"):
        preset_path("rae", "does-not-exist")


def test_shift_from_shape_and_override():
    f = resolve(FlowConfig)
    assert f.resolved_shift((768, 16, 16)) == pytest.approx(48 ** 0.5)
    assert f.resolved_shift((768, 32, 32)) == pytest.approx(192 ** 0.5)
    assert resolve(FlowConfig, overrides=["shift=2"]).resolved_shift((768, 16, 16)) == 2.0


def test_save_and_reload_round_trip(tmp_path):
    cfg = resolve(EncodeConfig, base={"rae": "tiny"}, overrides=["batch_size=5"])
    save_resolved(cfg, tmp_path / "config.yaml", extra={"command": "encode"})
    text = (tmp_path / "config.yaml").read_text()
    assert "rae_version" in text and "command: encode" in text
    assert to_dict(load_resolved(EncodeConfig, tmp_path / "config.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_resolves_against_its_schema(name):
    from rae_cli.cli.schemas import SCHEMAS

    import rae_cli.cli  # noqa: F401  (registers every command's schema)

    kind, preset = name.split("/", 1)
    assert kind in SCHEMAS, f"preset folder {kind!r} has no registered schema"
    cfg = resolve(SCHEMAS[kind](), preset=preset)
    assert to_dict(cfg)


def test_rae_help_is_instant_and_imports_no_torch():
    code = ("import sys, time; t=time.time(); from rae_cli.cli import app; "
            "print('torch' in sys.modules, round(time.time()-t, 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False", "importing the CLI must not import torch"
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "rae_cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("encode", "recon", "presets"):
        assert cmd in res.stdout
    assert time.time() - t < 10
