"""What every training loop sets up the same way: processes, precision, gradient accumulation and a progress bar.

One code path for 1 or N processes (torchrun detected from the environment, :mod:`rae_cli.distributed`); the
process group is always torn down, whatever the loop raises.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def distributed_session(device: str, **init_options) -> Iterator:
    """``with distributed_session(cfg.device) as dist:`` — init torch.distributed (under torchrun), always shut down.

    ``init_options`` go to :func:`rae_cli.distributed.init`."""
    from rae_cli import distributed

    try:
        yield distributed.init(device, **init_options)
    finally:
        distributed.shutdown()


def setup_precision(device: torch.device, *, tf32: bool = True) -> None:
    """TF32 matmuls/convolutions on NVIDIA GPUs (both trainers; no effect on the CPU)."""
    from rae_cli.distributed import set_tf32

    set_tf32(device, tf32)


def autocast(device: torch.device, precision: str):
    """The forward-pass context of ``precision``: fp32 (off), bf16 or fp16 autocast."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """One per optimizer (sharing one between G and D lets D's overflow skip G's steps, spec §10.1 #9).

    Enabled for fp16 only; a disabled scaler is a pass-through, so loops call it unconditionally."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, sync_buffers: bool):
    """DDP over ``module``'s trainable parameters, the same way in both trainers.

    ``gradient_as_bucket_view=True``: the gradients are views into the all-reduce buckets instead of a second copy
    (one gradient's worth of memory less per rank). ``sync_buffers=False`` skips the per-forward buffer broadcast
    (buffers are still broadcast once at construction); torch ≥ 2.14 renamed that flag."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kwargs = {"device_ids": [device.index] if device.type == "cuda" else None, "gradient_as_bucket_view": True}
    if not sync_buffers:
        params = inspect.signature(DistributedDataParallel).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


def maybe_compile(module, enabled: bool):
    """``torch.compile(module)`` when asked for; the caller keeps the bare module for saving and the EMA."""
    return torch.compile(module) if enabled else module


def accumulation_context(model, *, last: bool, distributed: bool):
    """Inside a step's micro-batch loop: skip the gradient all-reduce on all but the last micro-batch — DDP's
    ``no_sync``, or FSDP's ``set_requires_gradient_sync(False)`` for a model that holds an FSDP-sharded module."""
    if not distributed or last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    from rae_cli.training.fsdp import fsdp_root, gradient_sync_off

    root = fsdp_root(model)
    return gradient_sync_off(root) if root is not None else contextlib.nullcontext()


def progress_bar(label: str, enabled: bool, info: bool = True):
    """The one training progress bar (rank 0): ``label``, bar, n/total, an info field, time remaining.

    ``progress.add_task(label, total=..., completed=..., info="")``; ``disable`` on other ranks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, TimeRemainingColumn(), disable=not enabled)
