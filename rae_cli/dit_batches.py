"""train-dit's data: one item per micro-batch, from a latent cache or from images encoded on the fly.

Every random draw is derived from counters with :func:`rae_cli.distributed.generator` — the data order from
(seed, epoch), the mirror coin / label dropout / time of every sample of the *global* batch from (seed, step) — so a
batch is a pure function of the step: any worker can make any step, and a resumed run gets the batches it would have
had. An unreadable image is replaced by a deterministic other one (:mod:`rae_cli.training.bad_images`).

A data-loader item is one micro-batch (not a whole step's share), and cached latents keep the cache's dtype
(bf16/fp16/fp32) until they are on the device: at 512 px one sample is 768·32·32 values, so a 64-sample bf16
micro-batch is 100 MB where a 1024-sample fp32 step share was 3.2 GB per item (×workers×prefetch in shared memory).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rae_cli.config import ConfigError
from rae_cli.errors import DataError
from rae_cli.train_dit_config import TrainDiTConfig

log = logging.getLogger(__name__)

# Stream ids for derive_seed(seed, stream, ...): one per kind of randomness, so that streams never collide.
SEED_INIT, SEED_ORDER, SEED_STEP, SEED_NOISE = 0, 1, 2, 3


def epoch_order(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The image order of ``epoch``: a permutation drawn from (seed, epoch) alone."""
    from rae_cli.distributed import generator

    return torch.randperm(num_images, generator=generator(seed, SEED_ORDER, epoch))


@dataclass(frozen=True)
class StepDraws:
    """Per-sample random choices of one global batch (G,), drawn on the CPU from (seed, step)."""

    u_mirror: torch.Tensor  # uniform: < 0.5 → use the horizontal mirror
    u_drop: torch.Tensor  # uniform: < label-dropout probability → null label
    t: torch.Tensor  # flow times, already shifted


def step_draws(cfg: TrainDiTConfig, step: int, shift: float) -> StepDraws:
    from rae_cli.distributed import generator
    from rae_cli.flow import sample_time

    g = generator(cfg.seed, SEED_STEP, step)
    n = cfg.global_batch_size
    u_mirror = torch.rand(n, generator=g)
    u_drop = torch.rand(n, generator=g)
    t = sample_time(n, cfg.flow.time_dist, mu=cfg.flow.logit_mu, sigma=cfg.flow.logit_sigma, t0=cfg.flow.t0,
                    t1=cfg.flow.t1, shift=shift, generator=g)
    return StepDraws(u_mirror, u_drop, t)


class MicroBatches(torch.utils.data.Dataset):
    """Item ``(step, k)`` = micro-batch k of this process's share of the global batch of ``step``:
    (x, labels, positions, skipped).

    x is raw latents (b, C, h, w) in the cache's dtype, or images (b, 3, S, S) in [0, 1]; ``positions`` are the
    samples' indices in the global batch: with B = G / processes and b = B / accumulation steps, rank r's
    micro-batch k holds [r·B + k·b, r·B + (k+1)·b). Pure function of (step, k), so any worker can produce any
    item and a resumed run gets exactly the batches it would have had.
    """

    def __init__(self, cfg: TrainDiTConfig, source: CacheSource | ImageSource, num_images: int,
                 steps_per_epoch: int, rank: int, world_size: int, shift: float, accum: int = 1):
        self.cfg, self.source, self.num_images = cfg, source, num_images
        self.steps_per_epoch, self.rank, self.world_size, self.shift = steps_per_epoch, rank, world_size, shift
        self.per_rank = cfg.global_batch_size // world_size
        self.micro = self.per_rank // accum
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # items are addressed directly; the sampler decides which ones
        return 2**62

    def images_of_step(self, step: int) -> torch.Tensor:
        """The global batch of ``step`` as image indices (G,) (drop_last: an epoch is steps_per_epoch batches)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.num_images))
        g = self.cfg.global_batch_size
        return self._order[1][i * g:(i + 1) * g]

    def __getitem__(self, index: tuple[int, int]):
        step, k = index
        lo = self.rank * self.per_rank + k * self.micro
        pos = torch.arange(lo, lo + self.micro)
        images = self.images_of_step(step)[pos]
        draws = step_draws(self.cfg, step, self.shift)
        mirror = (draws.u_mirror[pos] < 0.5) if self.cfg.hflip else torch.zeros(len(pos), dtype=torch.bool)
        x, y, skipped = self.source.fetch(images, mirror)
        return x, y, pos, skipped


class MicroBatchOrder(torch.utils.data.Sampler):
    """The loader's items in training order: (step, 0), …, (step, accum − 1) for each step in [start, stop)."""

    def __init__(self, start: int, stop: int, accum: int):
        self.start, self.stop, self.accum = start, stop, accum

    def __iter__(self):
        return ((step, k) for step in range(self.start, self.stop) for k in range(self.accum))

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum


class CacheSource:
    """Raw latents from a :class:`~rae_cli.latent_cache.LatentCache`; a mirror is the cached mirror's latent."""

    def __init__(self, cache):
        self.cache = cache

    def fetch(self, images: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        # (b, C, h, w) in the cache's dtype (fp32 only on the device: half the bytes for a bf16 cache), (b,)
        x, y = self.cache.read(self.cache.rows(images, mirror), dtype=None)
        return x, y, []


class ImageSource:
    """Images decoded on demand (ADM center crop, then the flip). An unreadable file is replaced by a deterministic
    other image (with its label) and reported as skipped [(file, reason)]."""

    def __init__(self, files, labels, image_size: int, seed: int):
        self.files, self.labels, self.image_size, self.seed = files, labels, image_size, seed

    def _read(self, i: int) -> torch.Tensor:
        from rae_cli.data import load_image

        return load_image(self.files[i], self.image_size, crop="adm")  # (3, S, S); DataError names the file

    def fetch(self, images: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        from rae_cli.training.bad_images import read_or_replace

        xs, labels, skipped = [], [], []
        for i in images.tolist():
            x, used, bad = read_or_replace(self._read, i, len(self.files), self.seed, lambda k: str(self.files[k]))
            xs.append(x)
            labels.append(self.labels[used])
            skipped.extend(bad)
        x = torch.stack(xs)  # (B, 3, S, S)
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)  # RandomHorizontalFlip after the crop
        return x, torch.tensor(labels, dtype=torch.int64), skipped


def collate_micro(item):
    return item


@dataclass
class Data:
    source: Any
    num_images: int
    latent_shape: tuple[int, int, int]
    num_classes: int
    classes: list
    stats_path: Optional[str]
    encoder: Any = None  # the frozen RAE (stats-free) for on-the-fly encoding


_ENCODER_KEYS = ("encoder", "encoder_source", "encoder_random_init", "encoder_input_size", "encoder_options")


def open_data(cfg: TrainDiTConfig, device: torch.device) -> Data:
    """The latent cache or image folder of ``cfg``, with everything derived from it."""
    if cfg.cache:
        from rae_cli.latent_cache import LatentCache

        cache = LatentCache(cfg.cache, local_dir=cfg.cache_local_dir)
        diff = [k for k in _ENCODER_KEYS if cache.rae.get(k) != getattr(cfg.rae, k)]
        if cache.rae.get("encoder_random_init") and cache.rae.get("seed") != cfg.rae.seed:
            diff.append("seed")
        if diff:
            detail = "; ".join(f"rae.{k}: cache {cache.rae.get(k)!r}, config {getattr(cfg.rae, k)!r}" for k in diff)
            raise ConfigError(f"the latent cache {cfg.cache} was made with a different encoder than this config's "
                              f"rae section ({detail}). Use the rae preset the cache was made with.")
        if cfg.hflip and cache.copies == 1:
            log.warning("hflip=true but the cache has no mirrored copies (cache-latents flip=false): no flips")
        stats = str(cache.stats_path) if cfg.stats == "auto" else cfg.stats
        return Data(CacheSource(cache), cache.num_images, cache.latent_shape, max(1, cache.num_classes),
                    cache.classes, stats)
    if cfg.images:
        from rae_cli.build import build_rae, image_size_of
        from rae_cli.data import scan_image_folder

        data = scan_image_folder(cfg.images)
        rae = build_rae(dataclasses.replace(cfg.rae, stats=None), device=device, parts={"encoder"}).eval()
        rae.requires_grad_(False)
        size = int(cfg.image_size or image_size_of(cfg.rae, rae.encoder_info.patch_size))
        stats = cfg.rae.stats if cfg.stats == "auto" else cfg.stats
        if stats is None:
            raise ConfigError("no latent statistics for on-the-fly training: set rae.stats (or stats=PATH), or "
                              "stats=none to train on raw latents (not what the paper does)")
        return Data(ImageSource(data.files, data.labels, size, cfg.seed), len(data.files), tuple(rae.latent_shape),
                    max(1, data.num_classes), list(data.classes), stats, rae)
    raise DataError("nothing to train on: give --cache DIR (from `rae cache-latents`) or --data DIR (images, "
                    "encoded on the fly)")


def resolve_stats_path(stats: str | None) -> str | None:
    if stats is None or stats == "none":
        return None
    from rae_cli.build import resolve_weights_path

    return str(Path(resolve_weights_path(stats)).resolve())


def normalize_latents(z: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """(z − mean)/√(var + eps) per element (spec §1.3); identity without statistics."""
    if mean is None:
        return z
    return (z - mean) / torch.sqrt(var + eps)


def noise_for(cfg: TrainDiTConfig, step: int, positions: torch.Tensor, latent_shape, device) -> torch.Tensor:
    """ε for the samples at ``positions`` of the global batch of ``step``: one generator per sample, so the noise
    of a sample does not depend on how the batch is split over processes or micro-batches."""
    from rae_cli.distributed import generator

    shape = tuple(int(d) for d in latent_shape)
    return torch.stack([torch.randn(shape, generator=generator(cfg.seed, SEED_NOISE, step, int(j), device=device),
                                    device=device) for j in positions])


@dataclass(frozen=True)
class StepInputs:
    """The per-sample draws of one global batch (G,) that the model sees: flow times, CFG label dropout, and
    MeanFlow's start times (None for flow matching), all drawn from (seed, step)."""

    t: torch.Tensor
    drop: Optional[torch.Tensor]  # 1 → the null label; None when class dropout is off
    r: Optional[torch.Tensor]


def step_inputs(cfg: TrainDiTConfig, step: int, shift: float) -> StepInputs:
    draws = step_draws(cfg, step, shift)
    t, r = draws.t, None
    if cfg.objective == "meanflow":  # MeanFlow draws its own (r, t) pair, from (seed, step) too
        from rae_cli.meanflow import draw_times

        r, t = draw_times(cfg.meanflow, cfg.flow, cfg.seed, step, cfg.global_batch_size, shift)
    p = cfg.dit.class_dropout_prob
    return StepInputs(t, (draws.u_drop < p).long() if p > 0 else None, r)


def micro_batch(cfg: TrainDiTConfig, step: int, inputs: StepInputs, x: torch.Tensor, y: torch.Tensor,
                pos: torch.Tensor, data: Data, mean, var, device: torch.device) -> tuple:
    """One loader item of step ``step`` as the model's input on ``device``: (z, y, t, noise, drop_ids or None,
    r or None) (r: MeanFlow's start time). Latents become fp32 here, after the copy to the device."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if data.encoder is not None:
        with torch.no_grad():  # the frozen encoder runs in fp32, outside DDP and autocast (official)
            x = data.encoder.encode(x)  # (b, C, h, w)
    z = normalize_latents(x.float(), mean, var, cfg.rae.eps)
    noise = noise_for(cfg, step, pos, data.latent_shape, device)
    return (z, y, inputs.t[pos].to(device), noise, None if inputs.drop is None else inputs.drop[pos].to(device),
            None if inputs.r is None else inputs.r[pos].to(device))


class StepMicroBatches:
    """The ``count`` micro-batches of one step, taken from the loader's ``items`` and moved to the device one at a
    time as they are iterated (so the device, like the loader, holds one micro-batch of inputs at a time)."""

    def __init__(self, items, count: int, make, on_skipped=None):
        self.items, self.count, self.make, self.on_skipped = items, count, make, on_skipped

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            x, y, pos, skipped = next(self.items)
            if self.on_skipped is not None:
                self.on_skipped(skipped)
            yield self.make(x, y, pos)
