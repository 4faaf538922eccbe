"""Theorem 1's width rule applied to a train-dit preset without training (``rae overfit-probe --check PRESET``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rae_cli.config import ConfigError
from rae_cli.probe_floors import paper_bound
from rae_cli.schema import DiTConfig, RAEConfig


@dataclass
class PresetCheck:
    preset: str
    encoder: str
    latent_channels: int
    tokens: int
    model: str
    hidden_size: Any
    width: int
    bound: float
    ok: bool

    def message(self) -> str:
        head = (f"{self.model} (hidden {self.hidden_size}; the output is written at width d = {self.width}) on "
                f"{self.encoder} latents ({self.latent_channels} channels, {self.tokens} tokens): ")
        if self.ok:
            body = self.hidden_size[0] if isinstance(self.hidden_size, list) else self.width
            note = (f"; its body ({body} wide) is narrower, which is fine: the wide head reads the noisy latent "
                    "itself (paper §4.3)" if body < self.latent_channels else "")
            return head + f"d ≥ n, so Theorem 1 does not limit the loss (bound {self.bound:g}){note}"
        return head + (f"d < n: by Theorem 1 the loss cannot go below (n − d)/n = {self.bound:.3f}, even on one "
                       "image; use a wider model or a DiT-DH head at least n wide")


def encoder_geometry(rae_cfg: RAEConfig) -> tuple[int, int]:
    """(hidden size, patch size) of the RAE's encoder from the registry or a local config.json, without weights."""
    from rae_cli.build import resolve_source
    from rae_cli.encoders import EFFNET_STAGES, ENCODERS

    source = resolve_source(rae_cfg.encoder_source)
    if source and (Path(source) / "config.json").is_file():
        cfg = json.loads((Path(source) / "config.json").read_text())
        return int(cfg["hidden_size"]), int(cfg["patch_size"])
    if rae_cfg.encoder == "efficientnet-lite0":
        stride = int(rae_cfg.encoder_options.get("stride", 8))
        return EFFNET_STAGES[stride][1], stride
    spec = ENCODERS.get(rae_cfg.encoder)
    if spec is None or "hidden_size" not in spec.config:
        raise ConfigError(f"cannot tell the latent channels of encoder {rae_cfg.encoder!r} without its weights; "
                          f"registry encoders: {', '.join(ENCODERS)}")
    return int(spec.config["hidden_size"]), int(spec.config["patch_size"])


def _section(cls: type, value: Any):
    from rae_cli.config import resolve

    if value is None:
        return resolve(cls)
    if isinstance(value, str):
        return resolve(cls, preset=value)
    return resolve(cls, base=value)


def check_train_preset(preset: str) -> PresetCheck:
    """Read a train-dit preset's ``dit`` and ``rae`` sections and apply Theorem 1's width rule to them."""
    from rae_cli.config import preset_path, read_yaml
    from rae_cli.dit import DIT_REGISTRY, DiTDH

    path = preset_path("train-dit", preset)
    data = read_yaml(path)
    dit = _section(DiTConfig, data.get("dit"))
    rae = _section(RAEConfig, data.get("rae"))
    channels, patch = encoder_geometry(rae)
    n = channels * dit.patch_size**2  # the token a patch-p DiT reads and writes
    if dit.name not in DIT_REGISTRY:
        raise ConfigError(f"{path}: unknown model {dit.name!r}; choose one of {', '.join(DIT_REGISTRY)}")
    cls, hidden, _, _ = DIT_REGISTRY[dit.name]
    hidden = dit.hidden_size if dit.hidden_size is not None else hidden
    # As in build_dit: DiT-DH writes its output from the head, so the head width is the one that counts.
    pair = isinstance(hidden, (list, tuple))
    width = int(hidden[1] if pair and cls is DiTDH else hidden[0] if pair else hidden)
    grid = rae.encoder_input_size // patch // dit.patch_size
    return PresetCheck(preset=preset, encoder=rae.encoder, latent_channels=n, tokens=grid * grid, model=dit.name,
                       hidden_size=list(hidden) if pair else hidden, width=width,
                       bound=paper_bound(n, width), ok=width >= n)
