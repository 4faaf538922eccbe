"""Shard output of ``rae cache-latents``: a background writer thread, and the per-shard statistics partials that let
the cache's exact statistics be summed without reading the shards back (layout: :mod:`rae_cli.latent_cache`).

Next to ``shard-SSSSS.safetensors`` the writer puts ``partial-stats/shard-SSSSS.safetensors``: the float64 Σz and
Σz² of that shard's stored latents (its ``entries`` rows, the shard file's size in the metadata). The statistics
of the cache are the sum of these partials, so a resumed run adds the partials of the shards it finds finished
instead of reading them again. A shard without a valid partial (a cache from an older version, a run killed
between the two files) is read once to make one.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Sequence

import torch

from rae_cli import faults
from rae_cli.errors import DataError
from rae_cli.latent_cache_read import _as_float, _read_header, read_shard_arrays, shard_name
from rae_cli.latent_stats import LatentStats

log = logging.getLogger("rae_cli.latent_cache")

SHARD_STATS_DIR = "partial-stats"
SHARD_STATS_FORMAT = "rae-latent-cache-partial-stats-v1"
READ_CHUNK = 256  # rows per float64 step when a shard is read back


def shard_stats_path(out: Path, s: int) -> Path:
    return Path(out) / SHARD_STATS_DIR / shard_name(s)


def save_shard_stats(out: Path, s: int, acc: LatentStats) -> None:
    """Write the partial of shard ``s`` (after the shard itself: it records the shard file's size)."""
    from rae_cli.checkpoint import save_safetensors

    save_safetensors(shard_stats_path(out, s), {"sum": acc.sum.cpu(), "sum_sq": acc.sum_sq.cpu()},
                     metadata={"format": SHARD_STATS_FORMAT, "shard": s, "entries": acc.n,
                               "shard_bytes": (Path(out) / shard_name(s)).stat().st_size})


def load_shard_stats(out: Path, s: int, latent_shape: Sequence[int]) -> LatentStats | None:
    """The stored partial of shard ``s`` if it is there and belongs to the shard on disk (same shard, row count,
    shape and file size); else None."""
    from rae_cli.checkpoint import CheckpointError, load_safetensors

    path = shard_stats_path(out, s)
    if not path.is_file():
        return None
    try:
        tensors, meta = load_safetensors(path)
        header, _ = _read_header(Path(out) / shard_name(s))
        rows = int(header["latents"]["shape"][0])
        ok = (meta.get("format") == SHARD_STATS_FORMAT and meta.get("shard") == s and meta.get("entries") == rows
              and meta.get("shard_bytes") == (Path(out) / shard_name(s)).stat().st_size
              and all(tuple(tensors[k].shape) == tuple(latent_shape) and tensors[k].dtype == torch.float64
                      for k in ("sum", "sum_sq")))
    except (CheckpointError, DataError, OSError, KeyError) as e:
        log.warning("ignoring the unreadable statistics partial %s (%s)", path, e)
        return None
    if not ok:
        log.warning("ignoring the statistics partial %s: it does not match %s", path, shard_name(s))
        return None
    acc = LatentStats(tuple(latent_shape))
    acc.count.fill_(rows)
    acc.sum.copy_(tensors["sum"])
    acc.sum_sq.copy_(tensors["sum_sq"])
    return acc


def shard_stats_from_file(out: Path, s: int, latent_shape: Sequence[int]) -> LatentStats:
    """The partial of shard ``s`` computed from its stored latents (the second pass that partials avoid)."""
    acc = LatentStats(tuple(latent_shape))
    lat = read_shard_arrays(Path(out) / shard_name(s))["latents"]
    for i in range(0, lat.shape[0], READ_CHUNK):
        acc.update(_as_float(lat[i:i + READ_CHUNK]))
    return acc


def shard_stats(out: Path, s: int, latent_shape: Sequence[int]) -> LatentStats:
    """Shard ``s``'s partial: the stored one, else read from the shard (and stored for the next time)."""
    acc = load_shard_stats(out, s, latent_shape)
    if acc is None:
        acc = shard_stats_from_file(out, s, latent_shape)
        try:
            save_shard_stats(out, s, acc)
        except OSError as e:  # a read-only cache still gets its statistics
            log.warning("could not store the statistics partial of %s (%s)", shard_name(s), e)
    return acc


def write_shard(out: Path, s: int, tensors: dict, metadata: dict, acc: LatentStats) -> None:
    """Shard ``s`` and then its partial, each atomically (a stale partial is removed first, so a partial never
    outlives the shard it describes)."""
    from rae_cli.checkpoint import save_safetensors

    shard_stats_path(out, s).unlink(missing_ok=True)
    save_safetensors(Path(out) / shard_name(s), tensors, metadata=metadata)
    save_shard_stats(out, s, acc)


class ShardWriter:
    """Writes shards in a background thread while the caller encodes the next ones.

    At most ``max_pending`` shards wait in the queue besides the one being written, so memory stays bounded (the
    caller blocks in :meth:`submit` until there is room). A failed write stops the thread; the next
    :meth:`submit` or :meth:`close` raises it in the caller as a :class:`DataError`. Files are written atomically,
    so whatever was finished is kept and a re-run resumes from it.
    """

    def __init__(self, out: Path, max_pending: int = 1, write=None):
        self.out = Path(out)
        self.written: list[int] = []
        self._write = write or write_shard
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: tuple[int, BaseException] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-latents-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            s, tensors, metadata, acc = item
            try:
                self._write(self.out, s, tensors, metadata, acc)
            except BaseException as e:  # noqa: BLE001 — handed to the caller's thread
                self._error = (s, e)
                return
            self.written.append(s)
            faults.point("cache-shard", s)

    def _check(self) -> None:
        if self._error is not None:
            s, e = self._error
            raise DataError(f"could not write {self.out / shard_name(s)} ({type(e).__name__}: {e}); the shards "
                            f"written before it are kept: fix the cause and re-run the same command to resume"
                            ) from e

    def _put(self, item) -> None:
        while True:
            self._check()
            if not self._thread.is_alive():
                self._check()  # an error is recorded before the thread ends
                raise RuntimeError("the cache-latents writer thread stopped")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def submit(self, s: int, tensors: dict, metadata: dict, acc: LatentStats) -> None:
        """Queue shard ``s`` for writing (blocks while ``max_pending`` shards already wait)."""
        self._put((s, tensors, metadata, acc))

    def close(self) -> None:
        """Wait for every queued shard to be written; raise if one failed."""
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after the file being written (the caller failed); queued shards are dropped."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
