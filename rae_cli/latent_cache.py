"""The latent cache: images encoded once by the frozen RAE encoder, stored as shards that ``train-dit`` memory-maps
(spec §10.3: the official code re-encodes every image on every step), plus exact per-element latent statistics (§8).

Layout of a cache folder::

    index.json                 manifest, written last: rae config, latent shape, dtype, classes, counts, bad files
    config.yaml                the resolved ``cache-latents`` config
    plan.json                  what fixes the content (settings, file-list hash): a re-run must match it to resume
    files.txt                  ``index<TAB>label<TAB>path`` of every source image (``source`` below points here)
    shard-00000.safetensors    one per ``shard_size`` source images, written atomically
    stats.safetensors          exact per-element mean/var (float64 sums) of the raw latents: an RAE stats file

A shard is complete iff its file exists. It holds ``latents`` (N, C, h, w) in the cache dtype, ``labels`` (N,) int64,
``flip`` (N,) uint8 and ``source`` (N,) int64, where N = images kept × copies, image-major: with flips, rows 2k and
2k+1 are image k and its horizontal mirror. Its metadata lists the unreadable images it skipped. Latents are **raw**
(the encoder's LayerNorm output, not normalised): ``train-dit`` normalises them with the statistics it is configured
with. Shards are standard safetensors files; for reading, the tensor bytes are memory-mapped directly with numpy
(offsets from the safetensors header), so a random batch is a fancy index into the page cache (bf16 is mapped as
uint16 and re-viewed); a reader opens a shard only when it first reads one of its rows. Work is split over torchrun
processes by shard (shard s → rank s mod world). On many nodes the cache folder is one path every node mounts
(a parallel filesystem); readers can copy shards to node-local scratch (:class:`LatentCache` ``local_dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from rae_cli import faults
from rae_cli.config import ConfigError, doc
from rae_cli.errors import DataError
from rae_cli.schema import RAEConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = "rae-latent-cache"
CACHE_VERSION = 1
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
FILES_FILE = "files.txt"
STATS_FILE = "stats.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CacheLatentsConfig:
    """``rae cache-latents``: an image folder → a sharded latent cache + exact latent statistics."""

    preset_kind: ClassVar[str] = "cache-latents"

    rae: RAEConfig = doc("The autoencoder whose encoder makes the latents (a string names an rae preset). Its "
                         "stats and decoder are not used: raw latents are cached.", factory=RAEConfig)
    image_size: Optional[int] = doc("ADM center-crop size; null = the autoencoder's image size (256 for dinov2-b).",
                                    None)
    dtype: str = doc("Latent dtype on disk: bf16 (half the size of fp32; ~0.4% rounding), fp16 or fp32.", "bf16")
    flip: bool = doc("Also cache the horizontal mirror of every image (the official RandomHorizontalFlip); "
                     "train-dit then picks one of the two per sample.", True)
    shard_size: int = doc("Source images per shard (a shard is the unit of resume and of work per process).", 1024)
    batch_size: int = doc("Images per encoder forward pass (per process).", 64)
    num_workers: int = doc("Image-decoding worker processes per process (0 = decode in the main process).", 4)
    precision: str = doc("Encoder precision: fp32 (official) or bf16 autocast.", "fp32")
    device: str = doc("auto, cpu or cuda (under torchrun: the local GPU).", "auto")
    dist_timeout: Optional[float] = doc("Under torchrun: minutes a collective waits for the other processes before "
                                        "the job fails (null = torch's default: NCCL 10, gloo 30).", None)
    tf32: bool = doc("Allow TF32 matmuls on NVIDIA GPUs for the encoder (no effect on CPU).", True)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.shard_size < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("shard_size and batch_size must be ≥ 1 and num_workers ≥ 0")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Building


def _content_plan(cfg: CacheLatentsConfig, files: Sequence[Path], labels: Sequence[int], root: Path,
                  image_size: int) -> dict:
    """Everything that fixes the cache content; a resumed run must produce exactly this plan."""
    rae = {k: v for k, v in dataclasses.asdict(cfg.rae).items()
           if not k.startswith("decoder") and k not in ("stats", "noise_tau", "eps")}
    listing = "\n".join(f"{lab}\t{f.relative_to(root)}" for f, lab in zip(files, labels))
    return {"rae_encoder": rae, "image_size": image_size, "dtype": cfg.dtype, "flip": cfg.flip,
            "shard_size": cfg.shard_size, "precision": cfg.precision, "num_files": len(files),
            "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _check_or_write_plan(out: Path, plan: dict) -> None:
    from rae_cli.checkpoint import atomic_write_json

    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
        if diff:
            detail = "; ".join(f"{k}: cached {old.get(k)!r}, now {plan.get(k)!r}" for k in diff[:4])
            raise DataError(f"{out} holds a latent cache made with different settings or images ({detail}). "
                            "Use a new output folder, or delete this one to start over.")
        return
    if any(out.glob("shard-*.safetensors")):
        raise DataError(f"{out} holds shards but no {PLAN_FILE}; it was not made by this version — use a new folder")
    atomic_write_json(path, plan)


def _write_file_list(out: Path, files: Sequence[Path], labels: Sequence[int], root: Path) -> None:
    from rae_cli.checkpoint import atomic_write_text

    atomic_write_text(out / FILES_FILE, "".join(f"{i}\t{lab}\t{f.relative_to(root)}\n"
                                                for i, (f, lab) in enumerate(zip(files, labels))))


class _ImageFiles(torch.utils.data.Dataset):
    """ADM-center-cropped images; an unreadable file yields (None, message) instead of raising."""

    def __init__(self, files: Sequence[Path], indices: Sequence[int], image_size: int):
        self.files, self.indices, self.image_size = files, list(indices), image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from rae_cli.data import load_image

        idx = self.indices[i]
        try:
            return idx, load_image(self.files[idx], self.image_size, crop="adm"), None
        except DataError as e:
            return idx, None, str(e)


def _collate(items):
    return items


def _encode_shard(rae, files, labels, indices, cfg: CacheLatentsConfig, image_size: int, device: torch.device,
                  progress=None, task=None) -> tuple[dict, list[dict]]:
    """Encode the images ``indices`` → shard tensors (image-major, mirror after original) and the bad files."""
    loader = torch.utils.data.DataLoader(_ImageFiles(files, indices, image_size), batch_size=cfg.batch_size,
                                         shuffle=False, num_workers=cfg.num_workers, collate_fn=_collate)
    lat, src, bad = [], [], []
    copies = 2 if cfg.flip else 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    for items in loader:
        good = [(idx, x) for idx, x, err in items if x is not None]
        for idx, _, err in items:
            if err is not None:
                log.warning("skipping unreadable image %s", err)
                bad.append({"index": idx, "path": str(files[idx]), "error": err})
        if good:
            x = torch.stack([x for _, x in good]).to(device)  # (B, 3, S, S) in [0, 1]
            if cfg.flip:
                x = torch.cat([x, x.flip(-1)])  # originals then mirrors: (2B, 3, S, S)
            with torch.no_grad(), autocast:
                z = rae.encode(x).float()  # raw latents (B·copies, C, h, w)
            if cfg.flip:
                b = len(good)
                z = torch.stack([z[:b], z[b:]], dim=1).flatten(0, 1)  # interleave: image k → rows 2k, 2k+1
            lat.append(z.to(DTYPES[cfg.dtype]).cpu())
            src.extend(idx for idx, _ in good)
        if progress is not None:
            progress.advance(task, len(items))
    c, h, w = rae.latent_shape
    latents = torch.cat(lat) if lat else torch.zeros(0, c, h, w, dtype=DTYPES[cfg.dtype])
    source = torch.tensor(src, dtype=torch.int64).repeat_interleave(copies)
    tensors = {
        "latents": latents,
        "labels": torch.tensor([labels[i] for i in src], dtype=torch.int64).repeat_interleave(copies),
        "flip": torch.arange(copies, dtype=torch.uint8).repeat(len(src)),
        "source": source,
    }
    return tensors, bad


def cache_latents(cfg: CacheLatentsConfig, images: str | Path, out_dir: str | Path) -> Path:
    """Encode every image under ``images`` into a latent cache at ``out_dir`` and compute its exact statistics.

    Re-running the same command resumes: finished shards are kept. Under torchrun each process encodes the shards
    s ≡ rank (mod world). Returns ``out_dir``.
    """
    from rae_cli import distributed
    from rae_cli.build import build_rae, image_size_of
    from rae_cli.checkpoint import save_safetensors
    from rae_cli.config import save_resolved
    from rae_cli.data import scan_image_folder

    dist = distributed.init(cfg.device, cfg.dist_timeout)
    distributed.set_tf32(dist.device, cfg.tf32)
    out = Path(out_dir)
    data = scan_image_folder(images)
    root = Path(images)
    rae = build_rae(dataclasses.replace(cfg.rae, stats=None), device=dist.device, decoder_weights=False).eval()
    image_size = int(cfg.image_size or image_size_of(cfg.rae, rae.encoder.patch_size))
    plan = _content_plan(cfg, data.files, data.labels, root, image_size)
    with distributed.main_first(dist):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _check_or_write_plan(out, plan)
            _write_file_list(out, data.files, data.labels, root)
            save_resolved(cfg, out / "config.yaml", extra={"images": str(root.resolve())})
    num_shards = math.ceil(len(data.files) / cfg.shard_size)
    missing = [s for s in range(num_shards) if not _shard_intact(out / shard_name(s), warn=dist.is_main)]
    complete = not missing and (out / INDEX_FILE).is_file() and (out / STATS_FILE).is_file()
    # Rank 0's listing, so that every rank agrees on the work left (and on whether there is any).
    missing, complete = distributed.from_main((missing, complete), dist)
    if complete:
        if dist.is_main:
            log.info("latent cache %s is already complete (%d shards); nothing to do", out, num_shards)
        return out
    distributed.barrier(dist)  # every rank has listed the missing shards before any writes a new one
    todo = [s for s in missing if s % dist.world_size == dist.rank]
    if dist.is_main:
        done = num_shards - len(missing)
        log.info("latent cache %s: %d images in %d shards (%d already done), latents %s %s%s", out,
                 len(data.files), num_shards, done, tuple(rae.latent_shape), cfg.dtype, " + mirrors" if cfg.flip
                 else "")
    progress = _progress(dist.is_main)
    with progress:
        task = progress.add_task("cache-latents", total=sum(len(_shard_indices(s, cfg, len(data.files)))
                                                           for s in todo))
        for s in todo:
            idx = _shard_indices(s, cfg, len(data.files))
            tensors, bad = _encode_shard(rae, data.files, data.labels, idx, cfg, image_size, dist.device,
                                         progress, task)
            save_safetensors(out / shard_name(s), tensors,
                             metadata={"shard": s, "images": len(idx) - len(bad), "bad": bad})
            faults.point("cache-shard", s)
    distributed.barrier(dist)
    latent_shape = tuple(rae.latent_shape)
    del rae
    _finish(out, num_shards, latent_shape, dist, dict(
        dtype=cfg.dtype, flip=cfg.flip, image_size=image_size, classes=list(data.classes), num_files=len(data.files),
        rae=dataclasses.asdict(cfg.rae)))
    return out


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


def _shard_indices(s: int, cfg: CacheLatentsConfig, n: int) -> list[int]:
    return list(range(s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size)))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def _exact_stats(out: Path, num_shards: int, latent_shape: Sequence[int], dist):
    """Per-element mean and population variance over every cached latent (mirrors included), with float64 sums.

    Each process sums its own shards (s ≡ rank mod world); the float64 sums are all-reduced. The result is
    deterministic for a given number of processes and agrees across process counts up to float64 rounding.
    """
    from rae_cli.latent_stats import LatentStats, all_reduce_

    acc = LatentStats(tuple(latent_shape))
    for s in range(dist.rank, num_shards, dist.world_size):
        lat = read_shard_arrays(out / shard_name(s))["latents"]
        for i in range(0, lat.shape[0], 256):
            acc.update(_as_float(lat[i:i + 256]))
    return all_reduce_(acc)


def _write_index(out: Path, *, num_shards: int, latent_shape: Sequence[int], dtype: str, flip: bool,
                 image_size: int | None, classes: Sequence[str], num_files: int, rae: dict) -> dict:
    """Gather per-shard counts and bad files (from the shard headers) into ``index.json``, atomically."""
    from rae_cli.checkpoint import atomic_write_json

    copies = 2 if flip else 1
    shards, bad = [], []
    for s in range(num_shards):
        header, meta = _read_header(out / shard_name(s))
        n = int(header["latents"]["shape"][0])
        shards.append({"file": shard_name(s), "entries": n, "images": n // copies})
        bad.extend(json.loads(meta.get("bad", "[]")))
    num_entries = sum(sh["entries"] for sh in shards)
    index = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "latent_shape": [int(d) for d in latent_shape], "dtype": dtype, "normalized": False,
        "flip": flip, "copies": copies, "image_size": image_size, "crop": "adm",
        "classes": list(classes), "num_classes": len(classes),
        "num_files": num_files, "num_images": num_entries // copies, "num_entries": num_entries,
        "num_bad": len(bad), "bad_files": bad,
        "stats": STATS_FILE, "shards": shards, "rae": dict(rae),
    }
    atomic_write_json(out / INDEX_FILE, index)
    return index


def _finish(out: Path, num_shards: int, latent_shape: Sequence[int], dist, index_fields: dict) -> None:
    """Exact statistics over all shards, then ``index.json`` (rank 0 writes both)."""
    from rae_cli import distributed
    from rae_cli.latent_stats import save_stats

    acc = _exact_stats(out, num_shards, latent_shape, dist)
    if dist.is_main:
        mean, var = acc.finalize()
        save_stats(out / STATS_FILE, mean, var, count=acc.n,
                   metadata={"source": "rae cache-latents", "normalized_input": False,
                             "dtype": index_fields["dtype"]})
        index = _write_index(out, num_shards=num_shards, latent_shape=latent_shape, **index_fields)
        log.info("latent cache complete: %d images (%d rows), %d unreadable skipped; stats → %s",
                 index["num_images"], index["num_entries"], index["num_bad"], out / STATS_FILE)
    distributed.barrier(dist)


def write_cache(out: str | Path, latents: torch.Tensor, labels: Sequence[int], *, rae: RAEConfig,
                classes: Sequence[str] = (), mirrors: torch.Tensor | None = None, dtype: str = "fp32",
                shard_size: int = 1024, image_size: int | None = None) -> Path:
    """A cache from latents already in memory (B, C, h, w) (and optionally their mirrors' latents): tests,
    conversions of ``rae encode`` output. Same layout and statistics as :func:`cache_latents`."""
    from rae_cli.checkpoint import save_safetensors
    from rae_cli.distributed import Dist

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = latents.shape[0]
    labels = torch.as_tensor(list(labels), dtype=torch.int64)
    copies = 1 if mirrors is None else 2
    num_shards = math.ceil(n / shard_size)
    for s in range(num_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        z = latents[lo:hi] if mirrors is None else torch.stack([latents[lo:hi], mirrors[lo:hi]], 1).flatten(0, 1)
        save_safetensors(out / shard_name(s), {
            "latents": z.to(DTYPES[dtype]),
            "labels": labels[lo:hi].repeat_interleave(copies),
            "flip": torch.arange(copies, dtype=torch.uint8).repeat(hi - lo),
            "source": torch.arange(lo, hi).repeat_interleave(copies),
        }, metadata={"shard": s, "images": hi - lo, "bad": []})
    _finish(out, num_shards, tuple(latents.shape[1:]), Dist(), dict(
        dtype=dtype, flip=mirrors is not None, image_size=image_size, classes=list(classes), num_files=n,
        rae=dataclasses.asdict(rae)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading

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


def _as_float(arr: np.ndarray) -> torch.Tensor:
    """Latent rows from a memory map → a float32 tensor (copied); uint16 data are bf16 bit patterns."""
    arr = np.asarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()  # a view into the read-only map (fancy indexing already returned a copy)
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


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

    def read(self, rows: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w) float32, labels (B,) int64) for the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"cache rows out of range [0, {len(self)})")
        shard = np.searchsorted(self._starts, rows, side="right") - 1  # (B,)
        lat = torch.empty((rows.size, *self.latent_shape), dtype=torch.float32)
        lab = torch.empty(rows.size, dtype=torch.int64)
        for s in np.unique(shard):
            maps = self._shard(int(s))
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self._starts[s]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            lat[torch.from_numpy(where[order])] = _as_float(maps["latents"][local[order]])
            lab[torch.from_numpy(where)] = torch.from_numpy(np.asarray(maps["labels"][local], dtype=np.int64))
        return lat, lab

