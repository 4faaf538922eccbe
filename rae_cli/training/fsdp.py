"""``parallel=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for both trainers, next to DDP's ``wrap_ddp``.

Each transformer block is one FSDP unit, the model root another (its embedders, final layer and norms), so a rank
holds 1/world of the weights, gradients, AdamW state and EMA, plus one all-gathered block at a time during the
forward and backward passes. What stays the same as DDP, on purpose:

- checkpoints: full (unsharded) state dicts, gathered to CPU on rank 0 (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``) and written by rank 0 through the
  ordinary checkpoint code, the optimizer state in ``optimizer.state_dict()``'s own integer-keyed layout. A
  checkpoint written under FSDP resumes under DDP or on one process and the other way round. On resume the full
  weights are loaded into the model *before* it is sharded (so ``fully_shard`` shards them) and the full optimizer
  state is sharded by ``set_optimizer_state_dict``.
- the EMA: its copy of the model gets the same DTensor layout as the sharded model (:func:`shard_like`), so the
  update stays the elementwise ``lerp`` of :class:`rae_cli.ema.EMA` over local shards; saving gathers it.
- gradient accumulation: ``set_requires_gradient_sync(False)`` on all but the last micro-batch (DDP: ``no_sync``),
  through :func:`rae_cli.training.session.accumulation_context` or :func:`gradient_sync_off`.
- clipping and the NaN guard: ``clip_grad_norm_`` over DTensor gradients returns the global norm (a DTensor;
  :func:`plain` makes it an ordinary tensor), identical on every rank.
- precision: bf16/fp16 gather the parameters in that dtype (``MixedPrecisionPolicy(param_dtype=...)``) and reduce
  gradients in fp32; the sharded master weights and AdamW state stay fp32, and autocast is kept as under DDP.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Mapping

import torch
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")


def check_parallel(parallel: str, key: str = "parallel") -> None:
    from rae_cli.config import ConfigError

    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"{key} must be ddp or fsdp, not {parallel!r}")


def wrap_fsdp(module: nn.Module, blocks: Iterable[nn.Module], device: torch.device, world_size: int,
              precision: str) -> nn.Module:
    """Shard each of ``blocks``, then ``module`` (the root, holding the rest) over all ``world_size`` processes.

    ``module`` is sharded in place (its class becomes an ``FSDPModule``) and returned. Parameters keep their names,
    so state dicts and optimizer order are those of the bare module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from rae_cli.training.session import PRECISIONS

    # The ViT decoder returns a slice (a view) of its logits; the trainers use every output out of place, so
    # FSDP's warning about in-place ops on views is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world_size,))
    dtype = PRECISIONS[precision]
    # The root's own inputs (latents, times) are not cast: times in bf16 would blur the timestep embedding.
    block_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    root_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                   cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_mp)
    fully_shard(module, mesh=mesh, mp_policy=root_mp)
    return module


def fsdp_root(model: nn.Module):
    """The outermost FSDP-sharded module inside ``model`` (itself, a compiled wrapper's or a parent's), or None."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


@contextlib.contextmanager
def gradient_sync_off(root):
    """FSDP's ``no_sync``: gradients of the micro-batches inside accumulate unsharded, without reduce-scatter."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def plain(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor: a DTensor (e.g. the norm ``clip_grad_norm_`` returns under FSDP) made whole."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_like(copy: nn.Module, model: nn.Module) -> None:
    """Give ``copy`` (an unsharded twin of ``model``, e.g. the EMA) the DTensor layout of sharded ``model``.

    Each rank keeps its own slice (no communication); elementwise updates between the two then run on local
    shards. Buffers stay as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = dict(model.named_parameters())
    for name, p in list(copy.named_parameters()):
        ref = sharded[name]
        if not isinstance(ref, DTensor):
            continue
        owner = copy.get_submodule(name.rpartition(".")[0]) if "." in name else copy
        local = distribute_tensor(p.detach(), ref.device_mesh, ref.placements, src_data_rank=None)
        if local.to_local().shape != ref.to_local().shape:
            raise RuntimeError(f"shard_like: {name} is sliced differently from the model's")
        owner.register_parameter(name.rpartition(".")[2], nn.Parameter(local, requires_grad=p.requires_grad))


def full_state(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` made whole on CPU, on rank 0 (other ranks: {}); every rank must call it.

    For a module with DTensor parameters that is not itself FSDP-sharded (the EMA copy of :func:`shard_like`)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in module.state_dict().items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            out[key] = whole.detach().cpu()
    return out


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full state dict on CPU on rank 0 ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in ``optimizer.state_dict()`` order (its integer keys)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded model, full, on CPU on rank 0 ({} elsewhere), in the integer-keyed layout
    of ``optimizer.state_dict()`` (what DDP and one process save); a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: v for n, v in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping) -> None:
    """Load a full integer-keyed optimizer state (from any checkpoint) into the optimizer of sharded ``model``;
    every rank passes the full state and keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from rae_cli.checkpoint import CheckpointError

    names = _param_names(model, optimizer)
    groups = state["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(names):
        raise CheckpointError(f"the saved optimizer state covers {sum(len(g['params']) for g in groups)} "
                              f"parameters, the model has {len(names)} trainable ones")
    by_name = {"state": {names[int(i)]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
