"""One code path for 1 or N processes: DDP is detected from torchrun's environment (nanoGPT style).

``gloo`` on CPU, ``nccl`` on CUDA. Seeds are derived here so that every rank's stream is documented in one place.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_minutes: float | None = None) -> Dist:
    """Initialise torch.distributed if launched by torchrun (``WORLD_SIZE`` > 1); pick the device.

    ``timeout_minutes`` bounds how long a collective (a barrier, a gradient all-reduce) waits for the other
    processes before failing; null = torch's default (10 min for NCCL, 30 for gloo). On many nodes raise it when
    rank 0 does long work that the others wait for (a large checkpoint written to a slow parallel filesystem). A
    process that fails ends the torchrun job, which then restarts (or stops).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type == "cpu":
        from rae_cli.cpu_malloc import keep_freed_memory

        keep_freed_memory()  # no page-fault storm every step (see rae_cli/cpu_malloc.py); results bit-identical
    if world > 1 and not torch.distributed.is_initialized():
        _warn_shared_rendezvous_store(rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def _warn_shared_rendezvous_store(rank: int) -> None:
    """torchrun (c10d rendezvous) lends its own store to the workers by default, and keeps it across restarts: a
    restarted worker can then read the previous attempt's connection keys and fail to connect (gloo: "Connection
    refused"; NCCL: a stale unique id), using up the restarts (pytorch/pytorch#135712). Setting
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun gives every attempt a fresh store. Only torchrun reads it,
    so a worker can only warn."""
    if (rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        log.warning("torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restart may fail to "
                    "reconnect the processes (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
                    "torchrun (examples/multinode/env.sh does)")


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def all_reduce_mean(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= dist.world_size
    return t


def all_reduce_sum_(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(t)
    return t


def broadcast_object(obj, dist: Dist, src: int = 0):
    if not dist.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def from_main(obj, dist: Dist):
    """Rank 0's value of ``obj`` on every rank: what the ranks must agree on (the checkpoint to resume from, the
    work left) is decided once, on rank 0, instead of by each node's own look at a shared filesystem, whose
    listings may lag on other nodes (NFS attribute caches) or change under them (rank 0 cleaning up)."""
    return broadcast_object(obj if dist.is_main else None, dist)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (global seed, rank, step, sample index, ...): stable across runs and machines."""
    import hashlib

    h = hashlib.sha256(b"rae:" + b":".join(str(int(p)).encode() for p in parts)).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


@contextlib.contextmanager
def main_first(dist: Dist):
    """Let rank 0 do something first (create folders, build caches), then the others."""
    if not dist.is_main:
        barrier(dist)
    yield
    if dist.is_main:
        barrier(dist)


def setup_logging(dist: Dist, level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; other ranks only warnings."""
    logging.basicConfig(level=level if dist.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """Allow TF32 matmuls/convolutions on NVIDIA GPUs (the official sampler's default); no effect elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
