"""The write side of a latent cache: ``rae cache-latents`` (:func:`cache_latents`, its config and helpers) and
:func:`write_cache` from latents in memory, both ending in the exact statistics and ``index.json`` (layout:
:mod:`rae_cli.latent_cache`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch

from rae_cli.config import ConfigError, doc
from rae_cli.errors import DataError
from rae_cli.latent_cache_read import (CACHE_FORMAT, CACHE_VERSION, FILES_FILE, INDEX_FILE, PLAN_FILE, STATS_FILE,
                                       _read_header, _shard_intact, shard_name)
from rae_cli.latent_cache_writer import ShardWriter, shard_stats, write_shard
from rae_cli.schema import RAEConfig

log = logging.getLogger("rae_cli.latent_cache")  # the name these messages always had

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


def _shard_batches(shards: Sequence[int], cfg: CacheLatentsConfig, n: int
                   ) -> tuple[list[int], list[list[int]], list[int]]:
    """The images of ``shards`` in order, the batches (positions in that list) and the shard of each batch.

    A batch never crosses a shard: batches are the ``batch_size`` chunks of each shard from its first image, as a
    loader per shard made them (an encoder's output can depend on the batch in its last bits)."""
    indices, batches, owner = [], [], []
    for s in shards:
        idx = _shard_indices(s, cfg, n)
        start = len(indices)
        indices.extend(idx)
        for lo in range(0, len(idx), cfg.batch_size):
            batches.append(list(range(start + lo, start + min(len(idx), lo + cfg.batch_size))))
            owner.append(s)
    return indices, batches, owner


def _encode_shards(rae, files, labels, shards: Sequence[int], cfg: CacheLatentsConfig, image_size: int,
                   device: torch.device, progress=None, task=None):
    """Encode the images of ``shards`` with one DataLoader (its workers decode across shard boundaries) and yield,
    per shard: (s, shard tensors (image-major, mirror after original), shard metadata, statistics partial).

    The partial is the float64 Σz, Σz² of the latents as stored (after rounding to the cache dtype), summed on
    ``device`` while encoding: the cache's statistics never need a second pass over the shards."""
    from rae_cli.latent_stats import LatentStats

    if not shards:
        return
    indices, batches, owner = _shard_batches(shards, cfg, len(files))
    loader = torch.utils.data.DataLoader(_ImageFiles(files, indices, image_size), batch_sampler=batches,
                                         num_workers=cfg.num_workers, collate_fn=_collate)
    copies = 2 if cfg.flip else 1
    dtype = DTYPES[cfg.dtype]
    shape = tuple(rae.latent_shape)
    stats_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def finish(s, lat, src, bad, acc):
        latents = torch.cat(lat) if lat else torch.zeros(0, *shape, dtype=dtype)
        tensors = {
            "latents": latents,
            "labels": torch.tensor([labels[i] for i in src], dtype=torch.int64).repeat_interleave(copies),
            "flip": torch.arange(copies, dtype=torch.uint8).repeat(len(src)),
            "source": torch.tensor(src, dtype=torch.int64).repeat_interleave(copies),
        }
        meta = {"shard": s, "images": len(src), "bad": bad}
        return s, tensors, meta, LatentStats(shape).merge(acc)

    cur = None
    for s, items in zip(owner, loader):
        if s != cur:
            if cur is not None:
                yield finish(cur, lat, src, bad, acc)
            cur, lat, src, bad, acc = s, [], [], [], LatentStats(shape, device=stats_device)
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
            z = z.to(dtype)
            acc.update(z)  # the stored values, in float64
            lat.append(z.cpu())
            src.extend(idx for idx, _ in good)
        if progress is not None:
            progress.advance(task, len(items))
    if cur is not None:
        yield finish(cur, lat, src, bad, acc)


def cache_latents(cfg: CacheLatentsConfig, images: str | Path, out_dir: str | Path) -> Path:
    """Encode every image under ``images`` into a latent cache at ``out_dir`` and compute its exact statistics.

    Each process reads its images with one DataLoader, hands every finished shard to a background writer thread
    (at most one more waits, so memory stays bounded) and sums the statistics while encoding; at the end one
    all-reduce of small float64 tensors makes the exact statistics, with no second pass over the shards.
    Re-running the same command resumes: finished shards (and their statistics partials) are kept. Under torchrun
    the missing shards are dealt out to the processes in turn. Returns ``out_dir``.
    """
    from rae_cli import distributed
    from rae_cli.build import build_rae, image_size_of
    from rae_cli.config import save_resolved
    from rae_cli.data import scan_image_folder

    dist = distributed.init(cfg.device, cfg.dist_timeout)
    distributed.set_tf32(dist.device, cfg.tf32)
    out = Path(out_dir)
    data = scan_image_folder(images)
    root = Path(images)
    rae = build_rae(dataclasses.replace(cfg.rae, stats=None), device=dist.device, parts={"encoder"}).eval()
    image_size = int(cfg.image_size or image_size_of(cfg.rae, rae.encoder_info.patch_size))
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
    # The missing shards dealt out in turn: a resumed run's work is even over the ranks whichever ranks left it.
    todo = missing[dist.rank::dist.world_size]
    if dist.is_main:
        done = num_shards - len(missing)
        log.info("latent cache %s: %d images in %d shards (%d already done), latents %s %s%s", out,
                 len(data.files), num_shards, done, tuple(rae.latent_shape), cfg.dtype, " + mirrors" if cfg.flip
                 else "")
    progress = _progress(dist.is_main)
    with progress, ShardWriter(out) as writer:
        task = progress.add_task("cache-latents", total=sum(len(_shard_indices(s, cfg, len(data.files)))
                                                           for s in todo))
        for s, tensors, meta, acc in _encode_shards(rae, data.files, data.labels, todo, cfg, image_size,
                                                    dist.device, progress, task):
            writer.submit(s, tensors, meta, acc)  # written in the background while the next shard is encoded
    distributed.barrier(dist)  # every shard and its statistics partial is on disk
    latent_shape = tuple(rae.latent_shape)
    del rae
    _finish(out, num_shards, latent_shape, dist, dict(
        dtype=cfg.dtype, flip=cfg.flip, image_size=image_size, classes=list(data.classes), num_files=len(data.files),
        rae=dataclasses.asdict(cfg.rae)))
    return out


def _shard_indices(s: int, cfg: CacheLatentsConfig, n: int) -> list[int]:
    return list(range(s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size)))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def _exact_stats(out: Path, num_shards: int, latent_shape: Sequence[int], dist):
    """Per-element float64 count, Σz, Σz² over every cached latent (mirrors included), all-reduced.

    Each process adds the per-shard partials (:mod:`rae_cli.latent_cache_writer`, made while encoding) of the
    shards s ≡ rank (mod world), in shard order, then one all-reduce sums the small float64 tensors. The result
    does not depend on which run or process encoded a shard; it agrees across process counts up to float64
    rounding. A shard without a partial is read once.
    """
    from rae_cli.latent_stats import LatentStats, all_reduce_

    acc = LatentStats(tuple(latent_shape))
    for s in range(dist.rank, num_shards, dist.world_size):
        acc.merge(shard_stats(out, s, latent_shape))
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
    from rae_cli.distributed import Dist
    from rae_cli.latent_stats import LatentStats

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = latents.shape[0]
    labels = torch.as_tensor(list(labels), dtype=torch.int64)
    copies = 1 if mirrors is None else 2
    num_shards = math.ceil(n / shard_size)
    for s in range(num_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        z = latents[lo:hi] if mirrors is None else torch.stack([latents[lo:hi], mirrors[lo:hi]], 1).flatten(0, 1)
        z = z.to(DTYPES[dtype])
        acc = LatentStats(tuple(latents.shape[1:]))
        acc.update(z)
        write_shard(out, s, {
            "latents": z,
            "labels": labels[lo:hi].repeat_interleave(copies),
            "flip": torch.arange(copies, dtype=torch.uint8).repeat(hi - lo),
            "source": torch.arange(lo, hi).repeat_interleave(copies),
        }, {"shard": s, "images": hi - lo, "bad": []}, acc)
    _finish(out, num_shards, tuple(latents.shape[1:]), Dist(), dict(
        dtype=dtype, flip=mirrors is not None, image_size=image_size, classes=list(classes), num_files=n,
        rae=dataclasses.asdict(rae)))
    return out
