"""train-decoder's data: a step-indexed sampler, so the batches of step s are a function of (seed, rank, s) alone.

Each epoch shuffles the training files with a seed of (seed, epoch); crops are seeded by (seed, rank, step, i). An
unreadable image is replaced by a deterministic other one (:mod:`rae_cli.training.bad_images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from rae_cli.config import ConfigError
from rae_cli.errors import DataError
from rae_cli.train_decoder_config import TrainDecoderConfig

# Seed tags of the data order and the hold-out split (the step's own draws are in rae_cli.decoder_step).
_ORDER_TAG, _HOLDOUT_TAG = 1001, 1002


class CropDataset(torch.utils.data.Dataset):
    """Item (file index, crop seed) → (the stage-1 random crop (3, S, S) in [0, 1], [(file, reason)] skipped).

    An unreadable file is replaced by a deterministic other one (:mod:`rae_cli.training.bad_images`), cropped
    with the same crop seed, so a resumed run makes the same replacement."""

    def __init__(self, files: Sequence[Path], image_size: int, scale: float, seed: int):
        self.files, self.image_size, self.scale, self.seed = list(files), image_size, scale, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, list]:
        from rae_cli.data import open_rgb, resize_short_random_crop, to_tensor
        from rae_cli.training.bad_images import read_or_replace

        index, seed = item

        def read(i: int) -> torch.Tensor:
            image = open_rgb(self.files[i])  # DataError names the file
            return to_tensor(resize_short_random_crop(image, self.image_size, np.random.default_rng(seed),
                                                      scale=self.scale))

        crop, _, skipped = read_or_replace(read, index, len(self.files), self.seed, lambda i: str(self.files[i]))
        return crop, skipped


def collate(items: list[tuple[torch.Tensor, list]]) -> tuple[torch.Tensor, list]:
    return torch.stack([x for x, _ in items]), [s for _, skipped in items for s in skipped]


@dataclass(frozen=True)
class Plan:
    """The run's shape, derived from the config, the data and the world size (never typed in twice)."""

    num_train: int
    steps_per_epoch: int
    total_steps: int
    micro_batch: int
    accum: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum


def make_plan(cfg: TrainDecoderConfig, num_train: int, world_size: int) -> Plan:
    g = cfg.train.global_batch_size
    if g % world_size:
        raise ConfigError(f"train.global_batch_size={g} is not divisible by the {world_size} processes")
    micro = cfg.train.micro_batch_size or g // world_size
    if g % (micro * world_size):
        raise ConfigError(f"train.global_batch_size={g} is not a multiple of micro_batch_size·processes = "
                          f"{micro}·{world_size}")
    steps_per_epoch = num_train // g  # drop_last, as the official DistributedSampler loader
    if steps_per_epoch == 0:
        raise DataError(f"{num_train} training images are fewer than one global batch ({g}); add images or lower "
                        "train.global_batch_size")
    total = max(1, round(cfg.train.epochs * steps_per_epoch))
    return Plan(num_train, steps_per_epoch, total, micro, g // (micro * world_size), world_size)


def split_holdout(files: Sequence[Path], holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files): ``holdout`` files picked by a seeded permutation; the rest keep their order."""
    if holdout >= len(files):
        raise DataError(f"data.holdout={holdout} leaves no training images out of {len(files)}")
    from rae_cli.distributed import derive_seed

    picked = set(np.random.default_rng(derive_seed(seed, _HOLDOUT_TAG)).permutation(len(files))[:holdout].tolist())
    train = [f for i, f in enumerate(files) if i not in picked]
    held = [f for i, f in enumerate(files) if i in picked]
    return train, held


def step_items(plan: Plan, step: int, *, seed: int, rank: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of ``step``: lists of (file index, crop seed).

    Each epoch shuffles the training files with a seed of (seed, epoch); step k of the epoch takes the global batch
    perm[k·G:(k+1)·G], of which rank r takes the r-th contiguous share. Crop seeds are (seed, rank, step, i).
    """
    from rae_cli.distributed import derive_seed

    epoch, k = divmod(step, plan.steps_per_epoch)
    perm = np.random.default_rng(derive_seed(seed, _ORDER_TAG, epoch)).permutation(plan.num_train)
    start = k * plan.per_rank * plan.world_size + rank * plan.per_rank
    share = perm[start:start + plan.per_rank]
    items = [(int(idx), derive_seed(seed, rank, step, i)) for i, idx in enumerate(share)]
    return [items[m * plan.micro_batch:(m + 1) * plan.micro_batch] for m in range(plan.accum)]


class StepSampler:
    """Yields the micro-batches of steps [start, end) in order (a DataLoader batch_sampler)."""

    def __init__(self, plan: Plan, start: int, end: int, seed: int, rank: int):
        self.plan, self.start, self.end, self.seed, self.rank = plan, start, end, seed, rank

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            yield from step_items(self.plan, step, seed=self.seed, rank=self.rank)


def group_steps(loader, accum: int) -> Iterator[list[torch.Tensor]]:
    """Group the loader's micro-batches by step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


