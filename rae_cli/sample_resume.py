"""Resuming ``rae sample`` in an existing output folder: per-image file paths and completeness, the check that
the folder was made with the same image-defining settings, and the pinning of each model source to what it used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rae_cli.config import ConfigError
from rae_cli.errors import RaeError
from rae_cli.sample_config import _FREE_KEYS, IMAGES_DIR, SampleConfig

log = logging.getLogger("rae_cli.sample")  # the name these messages always had

def png_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / IMAGES_DIR / f"{index:06d}.png"


def latent_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "latents" / f"{index:06d}.safetensors"


def _latent_complete(out_dir: Path, index: int) -> bool:
    from rae_cli.checkpoint import CheckpointError, check_safetensors_file

    try:
        check_safetensors_file(latent_path(out_dir, index))
    except CheckpointError:
        return False
    return True


def _check_resumable(cfg: SampleConfig, out_dir: Path) -> None:
    """A folder that already holds a config must have been made by the same image-defining settings."""
    from rae_cli.config import read_yaml, to_dict

    path = out_dir / "config.yaml"
    if not path.is_file():
        return
    new = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in _FREE_KEYS}
    old = {k: v for k, v in read_yaml(path).items() if k in new}
    for settings in (old, new):  # statistics are compared by content: a run's checkpoints each hold a copy
        rae = settings.get("rae")
        if isinstance(rae, dict) and rae.get("stats"):
            rae["stats"] = _stats_identity(rae["stats"])
    if cfg.labels is not None or cfg.label_sampling == "random":
        old.pop("num_images", None)  # more images may be added: earlier labels do not depend on N
        new.pop("num_images", None)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"{out_dir} already holds samples made with different settings ({', '.join(diff)}); "
                          "use a new output folder, or delete it to start over")


def _stats_identity(stats: str) -> str:
    """A statistics setting as its file's sha256 when it names a file (else the setting itself)."""
    from rae_cli.checkpoint import sha256_file

    path = Path(stats)
    return f"sha256:{sha256_file(path)}" if path.is_file() else stats


_SOURCES = {"checkpoint": lambda c: c.checkpoint, "guidance.guide_checkpoint": lambda c: c.guidance.guide_checkpoint}


def source_identity(source: str) -> dict:
    """What a ``checkpoint`` setting points at now: ``{"path", "sha256"}`` of the resolved checkpoint folder (a run
    folder → its newest intact step; the hash covers its weight files) or weights file (official .pt, artifact)."""
    import hashlib

    from rae_cli.checkpoint import sha256_file
    from rae_cli.stage2_loading import WEIGHT_FILES, _official_path, checkpoint_dir

    folder = checkpoint_dir(source)
    if folder is None:
        path = _official_path(source)
        return {"path": str(path.resolve()), "sha256": sha256_file(path)}
    h = hashlib.sha256()
    for name in sorted(WEIGHT_FILES.values()):
        if (folder / name).is_file():
            h.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return {"path": str(folder.resolve()), "sha256": h.hexdigest()}


def pin_sources(cfg: SampleConfig, out_dir: Path) -> tuple[SampleConfig, dict]:
    """The config with each model source fixed to the file/folder the images in ``out_dir`` were made with.

    A first run records what ``checkpoint=`` (and the guide) resolve to, with a content hash; a resumed run reuses
    that record — if the run folder gained a newer checkpoint meanwhile, the earlier one is still used, so one
    output folder never mixes two models. If the recorded checkpoint is gone or changed, it is an error.
    Returns (config to sample with, the record to save in config.yaml).
    """
    import dataclasses

    from rae_cli.config import read_yaml

    old = {}
    if (out_dir / "config.yaml").is_file():
        old = read_yaml(out_dir / "config.yaml").get("resolved_sources") or {}
    record, pinned = {}, {}
    for key, get in _SOURCES.items():
        source = get(cfg)
        if not source:
            continue
        before = old.get(key)
        if before is None:
            record[key] = source_identity(source)
            continue
        try:
            now = source_identity(before["path"])
        except (RaeError, OSError):
            now = None
        if now is None or now["sha256"] != before["sha256"]:
            state = "is no longer there" if now is None else "has changed since (its content hash differs)"
            raise ConfigError(f"{out_dir} holds images made with {key}={before['path']}, which {state}; finishing "
                              "with another model would mix two models in one folder. Use a new output folder, or "
                              "delete this one to start over")
        latest = source_identity(source)["path"]
        if latest != before["path"]:
            log.warning("%s now resolves to %s, but the images already in %s were made with %s: continuing with "
                        "that one (use a new output folder to sample the newer checkpoint)", key, latest, out_dir,
                        before["path"])
        record[key] = before
        pinned[key] = before["path"]
    if "checkpoint" in pinned:
        cfg = dataclasses.replace(cfg, checkpoint=pinned["checkpoint"])
    if "guidance.guide_checkpoint" in pinned:
        cfg = dataclasses.replace(cfg, guidance=dataclasses.replace(
            cfg.guidance, guide_checkpoint=pinned["guidance.guide_checkpoint"]))
    return cfg, record
