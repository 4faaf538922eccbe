"""Output locations, checked before any compute: every writing command calls one of these first, so an ``--out`` that
is a file, sits in a read-only place or under a file fails in one line (exit 2) instead of after hours of work.

The check is real, not a permission-bit guess: a temporary file is created (and removed) in the nearest existing
folder, so a read-only filesystem, a missing write permission and a full quota all show up (``os.access`` would
say yes to root on a read-only mount).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rae_cli.errors import RaeError


class OutputError(RaeError):
    """An output location that cannot be written; the message names it and what to do."""


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_write(folder: Path, target: Path, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rae-write-check-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{what} {target}: cannot write in {folder} ({e.strerror or e}); choose a writable "
                          "location") from None


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise :class:`OutputError` unless ``path`` is a writable folder or can be created as one. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, not a folder: give a folder path (it is created if "
                          "missing)")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {base} is a file, not a folder")
    _probe_write(base, path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise :class:`OutputError` unless a file can be written at ``path`` (its folder is created if missing)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: give a file path")
    base = _nearest_existing(path.absolute().parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {base} is a file, not a folder")
    _probe_write(base, path, what)
    return path
