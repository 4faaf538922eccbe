"""Exact per-element latent statistics (spec §8, with the fix of §10.3: exact sums instead of an EMA).

RAE normalizes latents as (z − mean)/√(var + eps) with mean and var of the full latent shape [C, h, w].
``LatentStats`` accumulates float64 sums and sums of squares over every sample seen, so the result is the
exact population mean / variance of the data, independent of batch size and (up to float64 rounding) of
order, and merges across processes by plain summation (``all_reduce_``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

STATS_FORMAT = "rae-latent-stats-v1"


class LatentStats:
    """Running float64 count / Σz / Σz² per latent element.

    Usage: ``acc.update(z)`` for each batch (B, *shape); across processes ``all_reduce_(acc)``; then
    ``mean, var = acc.finalize()`` (population variance, float32).
    """

    def __init__(self, shape: tuple[int, ...] | None = None, device: torch.device | str | None = None):
        self.shape = tuple(shape) if shape is not None else None
        self.device = torch.device(device) if device is not None else None
        self.count: torch.Tensor | None = None  # float64 scalar tensor (exact for counts < 2**53)
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        if self.shape is not None:
            self._allocate(self.device or torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(self.shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(self.shape, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        return 0 if self.count is None else int(self.count.item())

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Add a batch of latents (B, *shape)."""
        if z.ndim < 2:
            raise ValueError(f"expected a batch of latents (B, *shape), got shape {tuple(z.shape)}")
        if self.shape is None:
            self.shape = tuple(z.shape[1:])
            self._allocate(self.device or z.device)
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"latent shape {tuple(z.shape[1:])} does not match the accumulator's {self.shape}")
        z = z.detach().to(device=self.device, dtype=torch.float64)
        self.count += z.shape[0]
        self.sum += z.sum(dim=0)
        self.sum_sq += z.square().sum(dim=0)

    def merge(self, other: LatentStats) -> LatentStats:
        """Add another accumulator's data into this one (in place); returns self."""
        if other.count is None:
            return self
        if self.shape is None:
            self.shape = other.shape
            self._allocate(other.device)
        if other.shape != self.shape:
            raise ValueError(f"cannot merge stats of shape {other.shape} into {self.shape}")
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)
        self.sum_sq += other.sum_sq.to(self.device)
        return self

    def tensors_to_reduce(self) -> list[torch.Tensor]:
        """The accumulator's own tensors; summing each across processes in place merges all the data."""
        if self.count is None:
            raise ValueError("LatentStats has no shape yet: call update() once (or pass shape=) before reducing")
        return [self.count, self.sum, self.sum_sq]

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) as float32 tensors of the latent shape; var is the population variance (÷ n)."""
        if self.count is None or self.count.item() == 0:
            raise ValueError("no latents were accumulated")
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.square()).clamp_min(0)  # float64 keeps the cancellation small
        return mean.float().cpu(), var.float().cpu()


def all_reduce_(acc: LatentStats) -> LatentStats:
    """Sum ``acc`` over all processes with torch.distributed when it is initialized (no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        for t in acc.tensors_to_reduce():
            if nccl and t.device.type != "cuda":  # NCCL reduces GPU tensors only: round-trip a CPU accumulator
                buf = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                t.copy_(buf)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return acc


# ---------------------------------------------------------------------------------------------------
# Files: ours (safetensors) and the official stat.pt


def save_stats(path: str | os.PathLike, mean: torch.Tensor, var: torch.Tensor, count: int | None,
               metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``{"mean", "var"}`` (float32, latent shape) as safetensors with the sample count in the metadata
    (None when unknown, e.g. converted official stats)."""
    from rae_cli.checkpoint import save_safetensors

    if mean.shape != var.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and var {tuple(var.shape)} must have the same shape")
    meta = {"format": STATS_FORMAT, "count": None if count is None else int(count), "shape": list(mean.shape),
            **(metadata or {})}
    save_safetensors(path, {"mean": mean.float(), "var": var.float()}, meta)


def load_stats(path: str | os.PathLike, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) from our safetensors file, an official ``stat.pt`` (``{"mean", "var"}``, weights_only), or a
    diffusers AutoencoderRAE weights file (converted for ``(z − mean)/sqrt(var + eps)``, see ``diffusers_rae``).

    Like the official code, a missing mean is 0 and a missing var is 1; a file with neither is an error.
    """
    from rae_cli.checkpoint import CheckpointError, load_safetensors, torch_load_weights
    from rae_cli.diffusers_rae import is_diffusers_file

    path = Path(path)
    if is_diffusers_file(path):
        from rae_cli.diffusers_rae import load_stats as load_diffusers_stats

        return load_diffusers_stats(path, eps)
    if path.suffix == ".safetensors":
        stats, _ = load_safetensors(path)
    else:
        stats = torch_load_weights(path)
    if not isinstance(stats, Mapping):
        raise CheckpointError(f"{path}: expected a dict with 'mean' and/or 'var', got {type(stats).__name__}")
    mean, var = stats.get("mean"), stats.get("var")
    if mean is None and var is None:
        raise CheckpointError(f"{path} has neither 'mean' nor 'var' (keys: {sorted(stats)}); "
                              "it is not a latent statistics file")
    for key, t in (("mean", mean), ("var", var)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' is a {type(t).__name__}, not a tensor")
    if mean is None:
        log.warning("%s has no 'mean': using 0", path)
        mean = torch.zeros_like(var)
    if var is None:
        log.warning("%s has no 'var': using 1", path)
        var = torch.ones_like(mean)
    if mean.shape != var.shape:
        raise CheckpointError(f"{path}: mean {tuple(mean.shape)} and var {tuple(var.shape)} differ in shape")
    return mean.float(), var.float()
