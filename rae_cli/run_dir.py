"""The folder of a training run: atomic checkpoints, finding the latest, retention (spec §10.3), metrics log.

Layout (shared by ``train-dit`` and ``train-decoder``)::

    OUT/checkpoints/
        step-000001000/            one complete checkpoint (a folder appears only once fully written)
            model.safetensors      weights in the model's own key names (one file per entry of ``weights``)
            ema.safetensors
            resume.pt              private resume state (optimizer, counters): tensors/numbers/lists/dicts only,
                                   loadable with ``torch.load(weights_only=True)``
            config.yaml            the resolved config of the run
            meta.json              step, format version, package version, anything the trainer adds, and
                                   ``files``: name → {sha256, size} of every other file (written last)
        latest                     text file naming the newest folder (convenience; the scan is authoritative)
    OUT/metrics.jsonl              one JSON line per logged step (:class:`MetricsLogger`; + optional TensorBoard/W&B)

A checkpoint is written into a hidden temporary folder (every file fsynced), renamed into place and the folder
fsynced, so a crash never leaves a half-written ``step-*`` folder. Resume = :func:`latest_checkpoint`: the newest
checkpoint that passes :func:`verify_checkpoint` (headers, sizes and content hashes); a damaged newer one is moved
aside (``.damaged-step-*``) with a warning naming both. Checkpoints written before the hashes existed are checked
structurally only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from rae_cli import faults
from rae_cli.checkpoint import (CheckpointError, atomic_write_json, atomic_write_text, check_safetensors_file,
                                durable_replace, fsync_dir, load_safetensors, save_safetensors, save_torch_atomic,
                                sha256_file, torch_load_weights)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
RESUME_FILE = "resume.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):09d}"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder."""

    path: Path
    step: int

    @property
    def meta(self) -> dict:
        return json.loads((self.path / META_FILE).read_text())

    def weights(self, name: str = "model", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The state dict saved as ``<name>.safetensors``."""
        tensors, _ = load_safetensors(self.path / f"{name}.safetensors", device=device)
        return tensors

    def resume_state(self) -> dict:
        state = torch_load_weights(self.path / RESUME_FILE)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path / RESUME_FILE} does not hold a resume-state dict")
        return state


def _step_folders(root: Path) -> list[Checkpoint]:
    """Every ``step-*`` folder under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append(Checkpoint(p, int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def list_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """The complete checkpoints under ``root`` (the ``checkpoints/`` folder), oldest first (not verified)."""
    return [c for c in _step_folders(Path(root)) if (c.path / META_FILE).is_file()]


_VERIFIED: dict[tuple, bool] = {}  # (folder, (name, inode, size, mtime) of each file) verified in this process


def verify_checkpoint(ckpt: Checkpoint) -> None:
    """Raise CheckpointError naming what is wrong unless ``ckpt`` is intact.

    Checks: ``meta.json`` readable; every file it lists (``files``) present with the recorded size and SHA-256;
    every ``.safetensors`` file with a readable header and as long as the header says; the weight files meta.json
    names present; ``resume.pt`` a complete zip archive. A checkpoint written before content hashes existed (no
    ``files`` in meta.json) gets the structural checks only.
    """
    meta_path = ckpt.path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt.path} has no {META_FILE} (an interrupted or damaged save)")
    try:  # what is on disk now (a cheap stat of each file): a file changed since it was verified is verified again
        key = (str(ckpt.path),) + tuple((f.name, f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns)
                                        for f in sorted(ckpt.path.iterdir()))
    except OSError as e:
        raise CheckpointError(f"{ckpt.path} cannot be read ({e})") from None
    if _VERIFIED.get(key):
        return
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is not readable ({e})") from None
    for name, info in (meta.get("files") or {}).items():
        f = ckpt.path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {META_FILE})")
        size = f.stat().st_size
        if size != int(info["size"]):
            raise CheckpointError(f"{f} has {size} bytes, {META_FILE} recorded {info['size']} (truncated or "
                                  "overwritten)")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f} does not match the SHA-256 recorded in {META_FILE} (the file is damaged)")
    for name in meta.get("weights") or []:
        if not (ckpt.path / f"{name}.safetensors").is_file():
            raise CheckpointError(f"{ckpt.path / f'{name}.safetensors'} is missing")
    for f in sorted(ckpt.path.glob("*.safetensors")):
        check_safetensors_file(f)
    resume = ckpt.path / RESUME_FILE
    if resume.is_file() and not zipfile.is_zipfile(resume):
        raise CheckpointError(f"{resume} is not a complete torch.save archive (truncated or damaged)")
    _VERIFIED[key] = True


def _newest_valid(candidates: list[Checkpoint], where: Path, *, move_aside: bool) -> Checkpoint | None:
    """The newest checkpoint of ``candidates`` that verifies; damaged newer ones are reported (and moved aside)."""
    damaged: list[tuple[Checkpoint, CheckpointError]] = []
    chosen = None
    for ckpt in reversed(candidates):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            damaged.append((ckpt, e))
            continue
        chosen = ckpt
        break
    for ckpt, err in damaged:
        aside = ckpt.path.parent / f".damaged-{ckpt.path.name}"
        moved = False
        if move_aside:  # a damaged newer folder must not count for retention nor be tried again
            try:
                if aside.exists():
                    shutil.rmtree(aside)
                durable_replace(ckpt.path, aside)
                moved = True
            except OSError:
                pass
        log.warning("checkpoint %s is damaged (%s); %s%s", ckpt.path.name, err,
                    f"falling back to the previous valid checkpoint {chosen.path.name}" if chosen is not None
                    else f"no valid checkpoint is left under {where}",
                    f" (the damaged folder is kept as {aside.name})" if moved else "")
    return chosen


def latest_checkpoint(root: str | os.PathLike) -> Checkpoint | None:
    """The newest intact checkpoint under ``root`` (see :func:`verify_checkpoint`), or None.

    A damaged newer checkpoint (truncated, zero-length or missing file, wrong hash, no meta.json) is skipped with a
    warning naming it and the one used instead, and renamed to ``.damaged-step-*`` where the folder is writable.
    """
    root = Path(root)
    return _newest_valid(_step_folders(root), root, move_aside=True)


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder, a ``checkpoints/`` folder or a run folder → the checkpoint it names (newest intact one
    if many). A ``step-*`` folder named explicitly must itself be intact."""
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    if m and path.is_dir():
        ckpt = Checkpoint(path, int(m.group(1)))
        verify_checkpoint(ckpt)
        return ckpt
    for root in (path, path / "checkpoints"):
        if _step_folders(root):
            ck = latest_checkpoint(root)
            if ck is None:
                raise CheckpointError(f"every checkpoint under {root} is damaged (see the warnings above)")
            return ck
    raise CheckpointError(f"no checkpoint found at {path} (expected a step-* folder with {META_FILE}, or a run "
                          "folder containing checkpoints/step-*)")


def save_checkpoint(root: str | os.PathLike, step: int, *, weights: Mapping[str, Mapping[str, torch.Tensor]],
                    resume_state: Mapping[str, Any] | None = None, config: Any = None,
                    meta: Mapping[str, Any] | None = None) -> Checkpoint:
    """Write ``root/step-<step>/`` atomically and point ``root/latest`` at it.

    ``weights``: file stem → state dict (e.g. ``{"model": ..., "ema": ...}``), each saved as safetensors.
    ``config``: a resolved config dataclass (written with :func:`rae_cli.config.save_resolved`).
    An existing folder for the same step is replaced.
    """
    from rae_cli import __version__
    from rae_cli.config import save_resolved

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, sd in weights.items():
            save_safetensors(tmp / f"{name}.safetensors", sd)
        if resume_state is not None:
            save_torch_atomic(tmp / RESUME_FILE, dict(resume_state))
        if config is not None:
            save_resolved(config, tmp / CONFIG_FILE)
        # Content hashes of every file, read back from what is on disk (the page cache: cheap next to the write).
        files = {f.name: {"sha256": sha256_file(f), "size": f.stat().st_size}
                 for f in sorted(tmp.iterdir()) if f.is_file() and not f.name.startswith(".")}
        info = {"format": CHECKPOINT_FORMAT, "step": int(step), "rae_version": __version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "weights": sorted(weights), **dict(meta or {}),
                "files": files}
        atomic_write_json(tmp / META_FILE, info)  # last: a folder with meta.json is complete
        faults.point("checkpoint-before-rename")
        if final.exists():
            old = root / f".old-{final.name}-{os.getpid()}"
            durable_replace(final, old)
            durable_replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            durable_replace(tmp, final)  # the folder rename, fsynced in root
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / "latest", final.name + "\n")
    return Checkpoint(final, int(step))


def apply_retention(root: str | os.PathLike, *, keep_last: int, keep_every: int | None = None) -> list[Path]:
    """Delete old checkpoints: keep the ``keep_last`` newest and every one whose step is a multiple of
    ``keep_every`` (if given). The newest is always kept. Returns the deleted folders."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return []
    keep = {c.step for c in ckpts[-max(1, keep_last):]}
    if keep_every:
        keep |= {c.step for c in ckpts if c.step % keep_every == 0}
    removed = []
    for c in ckpts:
        if c.step not in keep:
            # Rename first so that a crash mid-delete never leaves a folder that looks complete but is not.
            trash = c.path.parent / f".del-{c.path.name}-{os.getpid()}"
            os.replace(c.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(c.path)
    if removed:
        log.info("retention: removed %s", ", ".join(p.name for p in removed))
    return removed


def clean_temporary(root: str | os.PathLike) -> None:
    """Remove leftovers of interrupted saves/deletes (hidden ``.tmp-``/``.old-``/``.del-`` folders).

    An ``.old-step-N`` folder whose ``step-N`` is missing (a crash between the two renames of a replace) is a
    complete checkpoint and is put back instead.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        m = re.match(r"^\.old-(step-\d+)-\d+$", p.name)
        if m and not (root / m.group(1)).exists() and (p / META_FILE).is_file():
            os.replace(p, root / m.group(1))
        elif p.name.startswith((".tmp-step-", ".old-step-", ".del-step-")):
            shutil.rmtree(p, ignore_errors=True)
    fsync_dir(root)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def check_loggers(*, tensorboard: bool = False, wandb: bool = False) -> None:
    """Fail before any work if an optional logger was asked for but its package is missing."""
    import importlib.util

    from rae_cli.errors import RaeError

    for wanted, module in ((tensorboard, "tensorboard"), (wandb, "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise RaeError(f"{module}=true needs the {module} package: pip install {module} "
                           "(or pip install 'rae-cli[logging]')")


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (later ones are about to be logged again).

    A line that does not parse (a torn last line after a kill, or any damaged line) is dropped with a warning
    instead of stopping the resume.
    """
    path = Path(path)
    if not path.is_file():
        return
    keep, bad = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            row_step = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            bad += 1
            continue
        if row_step <= step:
            keep.append(ln)
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (a line torn by an interrupted write)", path, bad)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


class MetricsLogger:
    """``OUT/metrics.jsonl`` plus optional TensorBoard (``OUT/tensorboard``) and W&B, written by rank 0 only.

    On resume from ``start_step``, lines of later steps (logged after that checkpoint, so about to be re-run) and
    unreadable lines (see :func:`truncate_metrics`) are dropped, so the file never holds a step twice. TensorBoard and W&B are imported only when asked for.
    """

    def __init__(self, out: Path, *, start_step: int, enabled: bool, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "rae", config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1)
        if wandb:
            import hashlib

            import wandb as wandb_module

            self.wandb = wandb_module
            run_id = hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:12]  # same run when resuming
            wandb_module.init(project=wandb_project, dir=str(out), config=dict(config or {}), id=run_id,
                              resume="allow")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
