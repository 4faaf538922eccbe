"""The read side of a latent cache (:class:`LatentCache`): the format constants and shard names it checks, and the
memory-mapped reading of shard files (the layout is described in :mod:`rae_cli.latent_cache`)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rae_cli.errors import DataError

log = logging.getLogger("rae_cli.latent_cache")  # the name these messages always had

CACHE_FORMAT = "rae-latent-cache"
CACHE_VERSION = 1
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
FILES_FILE = "files.txt"
STATS_FILE = "stats.safetensors"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_intact(path: Path, warn: bool = False) -> bool:
    """True if ``path`` exists with a readable header and all the bytes it announces; a damaged shard (truncated,
    zero-length: a copy cut short, a full disk) is reported and encoded again."""
    from rae_cli.checkpoint import CheckpointError, check_safetensors_file

    if not path.exists():
        return False
    try:
        check_safetensors_file(path)
    except CheckpointError as e:
        if warn:
            log.warning("damaged shard, encoding it again: %s", e)
        return False
    return True


# safetensors dtype → (numpy dtype used for the memory map, torch dtype it really is)
_ST_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16),
              "F32": (np.float32, torch.float32), "I64": (np.int64, torch.int64), "U8": (np.uint8, torch.uint8)}


def _read_header(path: Path) -> tuple[dict, dict]:
    """The safetensors header of ``path``: (tensor entries, metadata)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path} is not a readable cache shard ({e}); delete it and re-run cache-latents") from e
    meta = header.pop("__metadata__", {}) or {}
    return header, meta


def read_shard_arrays(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a shard as a read-only numpy array (bf16 appears as uint16)."""
    header, _ = _read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    out = {}
    for name, info in header.items():
        np_dtype, _ = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            out[name] = np.zeros(shape, dtype=np_dtype)
        else:
            out[name] = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + n + start, shape=shape)
    return out


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """Latent rows from a memory map → a tensor of the stored dtype (copied); uint16 data are bf16 bit patterns."""
    arr = np.asarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()  # a view into the read-only map (fancy indexing already returned a copy)
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _as_float(arr: np.ndarray) -> torch.Tensor:
    """Latent rows from a memory map → a float32 tensor (copied)."""
    return _as_tensor(arr).float()


class LatentCache:
    """Read side of a latent cache: random access to (latent, label) by row, memory-mapped.

    Rows are image-major: the ``copies`` rows of image k are k·copies + (0: original, 1: mirror). Opening the
    cache reads ``index.json`` only; a shard file is opened and memory-mapped the first time one of its rows is
    read, in each process, so a process touches only the shards its samples come from (on a parallel filesystem,
    many nodes do not all open every file up front).

    ``local_dir`` (optional, node-local scratch such as ``$SLURM_TMPDIR``): each shard is first copied there, on
    first use, and the copy is mapped instead of the shared file, so repeated random reads hit the local disk.
    Copies live under ``local_dir/<hash of the cache path>/`` and are current while their size and modification
    time match the shared file's; a copy is written to a temporary name and renamed, so the processes of one node
    can race for it safely.
    """

    def __init__(self, root: str | Path, local_dir: str | Path | None = None):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{self.root} is not a finished latent cache (no {INDEX_FILE}); run or re-run "
                            "`rae cache-latents` on it first")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != CACHE_FORMAT or self.index.get("version") != CACHE_VERSION:
            raise DataError(f"{path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest")
        self.latent_shape = tuple(int(d) for d in self.index["latent_shape"])
        self.copies = int(self.index["copies"])
        self.classes: list[str] = list(self.index["classes"])
        self.num_classes = int(self.index["num_classes"])
        self.num_images = int(self.index["num_images"])
        self.rae = dict(self.index["rae"])
        self.local_dir = None
        if local_dir is not None:
            key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]  # one folder per cache
            self.local_dir = Path(local_dir) / key
        self._files, self._entries, starts = [], [], [0]
        for sh in self.index["shards"]:
            if sh["entries"] == 0:
                continue
            self._files.append(self.root / sh["file"])
            self._entries.append(int(sh["entries"]))
            starts.append(starts[-1] + sh["entries"])
        self._starts = np.asarray(starts, dtype=np.int64)
        self._maps: dict[int, dict[str, np.ndarray]] = {}  # shard → its arrays, opened on first read
        if self.num_images == 0:
            raise DataError(f"{self.root} holds no latents (every image was unreadable?)")

    def __getstate__(self) -> dict:
        # Data-loader workers re-open the memory maps instead of receiving pickled copies of them.
        return {**self.__dict__, "_maps": {}}

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        """The memory-mapped arrays of shard ``s`` (the s-th non-empty shard), opened and checked on first use."""
        maps = self._maps.get(s)
        if maps is None:
            if not self._files[s].exists():
                raise DataError(f"{self._files[s]} is missing; re-run `rae cache-latents` on the same images and "
                                "--out to encode it again")
            path = self._files[s] if self.local_dir is None else self._local_copy(self._files[s])
            if not _shard_intact(path):
                raise DataError(f"{path} is damaged (truncated?); re-run `rae cache-latents` on the same images and "
                                f"--out to encode {self._files[s].name} again")
            maps = read_shard_arrays(path)
            if tuple(maps["latents"].shape) != (self._entries[s], *self.latent_shape):
                raise DataError(f"{path} does not match {self.root / INDEX_FILE}; re-run cache-latents")
            self._maps[s] = maps
        return maps

    def _local_copy(self, src: Path) -> Path:
        """``src`` copied into the node-local ``local_dir``, once per node: a copy counts as current while its size
        and modification time equal the source's (a rebuilt cache has new times, so stale copies are replaced)."""
        dst = self.local_dir / src.name
        try:
            st = src.stat()
            if dst.is_file():
                have = dst.stat()
                if (have.st_size, have.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    return dst
            self.local_dir.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dst)
        except OSError as e:
            raise DataError(f"cannot copy cache shard {src} to the local folder {self.local_dir} ({e})") from e
        return dst

    @property
    def open_shards(self) -> list[Path]:
        """The shard files this process has opened so far (in the shared cache folder)."""
        return [self._files[s] for s in sorted(self._maps)]

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def stats_path(self) -> Path:
        return self.root / self.index["stats"]

    def rows(self, images: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        """Row of image ``images[i]`` (its mirror where ``mirror[i]`` and the cache has mirrors)."""
        rows = images.long() * self.copies
        if mirror is not None and self.copies == 2:
            rows = rows + mirror.long()
        return rows

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The dtype the latents are stored in (that of the first shard; a cache is written in one dtype)."""
        header, _ = _read_header(self._files[0])
        return _ST_DTYPES[header["latents"]["dtype"]][1]

    def read(self, rows: torch.Tensor | Sequence[int], dtype: torch.dtype | None = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w), labels (B,) int64) for the given rows, in that order; latents in ``dtype``, or
        in the cache's own dtype for ``dtype=None`` (e.g. bf16: half the bytes to carry to the device)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"cache rows out of range [0, {len(self)})")
        shard = np.searchsorted(self._starts, rows, side="right") - 1  # (B,)
        lat = torch.empty((rows.size, *self.latent_shape), dtype=dtype or self.dtype)
        lab = torch.empty(rows.size, dtype=torch.int64)
        for s in np.unique(shard):
            maps = self._shard(int(s))
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self._starts[s]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            lat[torch.from_numpy(where[order])] = _as_tensor(maps["latents"][local[order]]).to(lat.dtype)
            lab[torch.from_numpy(where)] = torch.from_numpy(np.asarray(maps["labels"][local], dtype=np.int64))
        return lat, lab
