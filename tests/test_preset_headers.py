"""Every `rae ...` command named in a preset's header comment exists: the subcommand, its options, the preset it
passes with -p, the download names, and the top-level key of every key=value override."""

from __future__ import annotations

import re
import shlex

import pytest
import typer

from rae_cli.cli import app
from rae_cli.config import list_presets, preset_path

# subcommand → the preset kind its -p/--preset names
PRESET_KIND = {"encode": "rae", "recon": "rae", "sample": "sample", "train-dit": "train-dit",
               "cache-latents": "cache-latents", "train-decoder": "train-decoder", "overfit-probe": "overfit-probe"}


def _header(path) -> str:
    """The leading comment block, continuation lines joined (a command may wrap onto the next `#` line)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def header_commands(path) -> list[str]:
    text = _header(path)
    found = [" ".join(m.split()) for m in re.findall(r"`(rae [^`]+)`", text)]  # backticked, may span lines
    unquoted = re.sub(r"`[^`]*`", "", text)
    found += [m.strip() for m in re.findall(r"^(?:[\w ]+:\s+)?(rae [a-z][^\n(]*)", unquoted, re.M)]
    return found


def _check(command: str, group) -> None:
    argv = shlex.split(command)[1:]
    name, args = argv[0], argv[1:]
    assert name in group.commands, f"`{command}`: no command {name!r}"
    cmd = group.commands[name]
    options = {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts) if p.param_type_name == "option"}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            assert a in options, f"`{command}`: {name} has no option {a}"
            if not options[a].is_flag:
                value = args[i + 1]
                if options[a].name == "preset" and not value.endswith(".yaml") and "/" not in value:
                    preset_path(PRESET_KIND[name], value)  # raises for an unknown preset
                i += 1
        elif "=" in a and name in PRESET_KIND:
            from rae_cli.cli.schemas import SCHEMAS

            key = a.split("=", 1)[0].split(".")[0]
            kind = "rae" if PRESET_KIND[name] == "rae" else PRESET_KIND[name]
            schema = {"encode": "encode", "recon": "recon"}.get(name, kind)
            assert key in SCHEMAS[schema]().__dataclass_fields__, f"`{command}`: no config key {key!r}"
        elif name == "download":
            from rae_cli import weights

            assert a in weights.BUNDLES or a in weights.ARTIFACTS, f"`{command}`: no bundle or artifact {a!r}"
        i += 1


PRESETS = list_presets()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_commands_exist(preset):
    group = typer.main.get_command(app)
    kind, name = preset.split("/", 1)
    for command in header_commands(preset_path(kind, name)):
        _check(command, group)


def test_header_parser_finds_and_rejects():
    """The checker is not vacuous: it finds the commands of the shipped headers and rejects wrong ones."""
    found = [c for p in PRESETS for c in header_commands(preset_path(*p.split("/", 1)))]
    assert "rae download dinov2-b" in found and "rae download dit-dh-xl_in256" in found
    assert any(c.startswith("rae train-dit -p dit-dh-xl_dinov2-b_in256 --cache") for c in found)
    group = typer.main.get_command(app)
    for bad in ("rae download rae-dinov2-b", "rae frobnicate", "rae sample --no-such-flag",
                "rae train-dit -p no-such-preset", "rae sample no_such_key=1"):
        with pytest.raises((AssertionError, Exception)):
            _check(bad, group)
