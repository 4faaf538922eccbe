"""Unreadable training images: counted, logged once per run, and replaced by a deterministic other image.

A training folder of a million images has a few that cannot be decoded (truncated, zero bytes, not an image, a
decompression bomb). The trainers do not stop for them: the sample is replaced by the first readable image of a
sequence drawn from (seed, the bad image's index), so a resumed run makes exactly the same replacement and stays
bit-identical. Rank 0 appends each bad file once to ``OUT/skipped_images.jsonl`` and the metrics carry the count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from rae_cli.errors import DataError

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_images.jsonl"
MAX_REPLACEMENTS = 32  # tries before giving up: a folder this broken is an error, not noise
_REPLACE_STREAM = 7001

T = TypeVar("T")


def replacement_index(seed: int, index: int, attempt: int, num: int) -> int:
    """The ``attempt``-th replacement of image ``index`` among ``num``: a function of (seed, index, attempt) only."""
    from rae_cli.distributed import derive_seed

    return derive_seed(seed, _REPLACE_STREAM, index, attempt) % num


def read_or_replace(read: Callable[[int], T], index: int, num: int, seed: int, name: Callable[[int], str]
                    ) -> tuple[T, int, list[tuple[str, str]]]:
    """``read(index)``, or, when it raises :class:`DataError`, ``read`` of the deterministic replacements in turn.

    Returns (value, the index actually read, [(file, reason)] of the images skipped on the way)."""
    skipped: list[tuple[str, str]] = []
    current = index
    for attempt in range(MAX_REPLACEMENTS + 1):
        try:
            return read(current), current, skipped
        except DataError as e:
            skipped.append((name(current), str(e)))
            current = replacement_index(seed, index, attempt, num)
    raise DataError(f"{len(skipped)} images in a row could not be read (the first: {skipped[0][0]}); the training "
                    f"folder looks broken — see {SKIPPED_FILE} in the run folder")


class SkippedLog:
    """``OUT/skipped_images.jsonl`` (rank 0): one line per distinct bad file; ``count`` includes earlier launches."""

    def __init__(self, out: Path, enabled: bool):
        self.path = Path(out) / SKIPPED_FILE
        self.enabled = enabled
        self.seen: set[str] = set()
        if enabled and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.seen.add(json.loads(line)["file"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line of a killed run

    @property
    def count(self) -> int:
        return len(self.seen)

    def add(self, entries: Iterable[tuple[str, str]], step: int) -> None:
        if not self.enabled:
            return
        new = [(f, why) for f, why in dict(entries).items() if f not in self.seen]
        if not new:
            return
        with open(self.path, "a") as fh:
            for f, why in new:
                fh.write(json.dumps({"file": f, "step": int(step), "reason": why}) + "\n")
                self.seen.add(f)
                log.warning("skipped an unreadable training image (replaced by another; see %s): %s", self.path, why)


def gather(entries: list[tuple[str, str]], dist) -> list[tuple[str, str]]:
    """Every rank's skipped entries, on every rank (a collective: all ranks call it at the same steps)."""
    if dist is None or not dist.enabled:
        return entries
    import torch

    boxes: list = [None] * dist.world_size
    torch.distributed.all_gather_object(boxes, entries)
    return [tuple(e) for box in boxes for e in box]
