"""`rae --help` groups the commands by stage; `rae presets --keys` without a kind lists every kind's keys."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from rae_cli.cli import PANELS, app


def test_every_command_has_a_stage_panel_in_pipeline_order():
    names = set(typer.main.get_command(app).commands)
    placed = [n for group in PANELS.values() for n in group]
    assert names == set(placed), f"commands without a panel: {names - set(placed)}; stale: {set(placed) - names}"
    out = CliRunner().invoke(app, ["--help"], terminal_width=120).output
    positions = [out.index(title) for title in PANELS]
    assert positions == sorted(positions)  # panels appear in stage order
    for title, group in PANELS.items():
        section = out[out.index(title):]
        assert all(section.index(f" {a} ") < section.index(f" {b} ") for a, b in zip(group, group[1:]))


def test_presets_keys_without_kind_lists_every_kind():
    from rae_cli.cli.schemas import SCHEMAS

    result = CliRunner().invoke(app, ["presets", "--keys"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for kind in SCHEMAS:
        assert f"{kind} keys" in result.output
    assert "encoder_input_size" in result.output and "guidance.scale" in result.output
    one = CliRunner().invoke(app, ["presets", "rae", "--keys"], terminal_width=200).output
    assert "encoder_input_size" in one and "guidance.scale" not in one
