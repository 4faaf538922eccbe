"""Expected peak memory per process, from a fake-tensor pass (nothing is allocated), and a live-tensor meter.

``--dry-run`` of ``train-dit`` / ``train-decoder`` / ``sample`` prints a :class:`MemoryPlan`: the model's weights,
gradients, AdamW state and EMA (divided over the processes under FSDP), and the activations that autograd keeps for
the backward at the micro-batch, counted exactly by running the real forward under ``FakeTensorMode`` with
saved-tensor hooks (so autocast's bf16 copies and activation checkpointing are seen as they are). What the plan
leaves out: the CUDA context and NCCL buffers (~0.5–1 GiB a GPU), allocator fragmentation, data-loader memory.

:class:`LiveTensorMeter` measures the same quantity on a real run: the peak of live tensor bytes on the CPU (the
analogue of ``torch.cuda.max_memory_allocated``); tests compare the plan with it at small sizes.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process by component; ``peak`` is the largest of the phases of a step."""

    what: str
    components: dict[str, int]
    phases: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def lines(self) -> list[str]:
        out = [f"memory plan per process — {self.what}"]
        for k, v in self.components.items():
            out.append(f"  {k:<34} {v / GiB:9.2f} GiB")
        for k, v in self.phases.items():
            out.append(f"  peak during {k:<22} {v / GiB:9.2f} GiB")
        out.append(f"  {'expected peak':<34} {self.peak / GiB:9.2f} GiB")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Counting on fake tensors


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_fake(factory: Callable[[], nn.Module]):
    """(model, fake mode): the model built with fake parameters (shapes and dtypes only, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = factory()
    return model, mode


def saved_activation_bytes(model: nn.Module, mode, make_inputs: Callable[[], tuple], *, precision: str = "fp32",
                           grad_checkpointing: bool = False, forward: Callable | None = None,
                           exclude: Sequence[nn.Module] = ()) -> tuple[int, int]:
    """(bytes autograd keeps after the forward, largest one-block recompute) for one training forward.

    Distinct storages are counted once (a tensor saved by several ops, or views of one tensor); the parameters
    themselves (saved by matmuls for the input gradient) are not activations and are counted as weights, and so are
    the parameters and buffers of the ``exclude`` modules (frozen networks in the loss). Under activation
    checkpointing the kept tensors are the block inputs; the backward recomputes one block at a time, which adds
    the largest block's saved tensors (measured per block with checkpointing off).
    """
    blocks = _blocks(model)
    weights = {t.untyped_storage()._cdata for m in (model, *exclude) for t in (*m.parameters(), *m.buffers())}

    def run(ckpt: bool) -> tuple[int, list[int]]:
        saved: dict[int, tuple[torch.Tensor, int]] = {}
        per_block = [0] * len(blocks)
        current = [-1]

        def pack(t: torch.Tensor):
            st = t.untyped_storage()
            if st._cdata not in weights and id(st) not in saved:  # the storage is held, so its id is not reused
                saved[id(st)] = (st, st.nbytes())
                if current[0] >= 0:
                    per_block[current[0]] += st.nbytes()
            return t

        hooks = []
        for i, b in enumerate(blocks):
            hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
            hooks.append(b.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
        for m in model.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = ckpt
        model.train()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        try:
            with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    args = make_inputs()
                    (forward or model)(*args)
        finally:
            for h in hooks:
                h.remove()
        return sum(n for _, n in saved.values()), per_block

    total, per_block = run(False)
    if not grad_checkpointing:
        return total, 0
    kept, _ = run(True)
    return kept, max(per_block, default=0)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the FSDP units of ``parallel=fsdp`` (DiT ``blocks``, ViT decoder ``decoder_layers``)."""
    for owner in (model, getattr(model, "decoder", None)):
        for name in ("blocks", "decoder_layers"):
            blocks = getattr(owner, name, None)
            if blocks is not None:
                return list(blocks)
    return []


def fsdp_gathered_bytes(model: nn.Module, precision: str = "fp32") -> tuple[int, int]:
    """(root unit, largest block) as FSDP gathers them, in the gathered dtype (bf16/fp16 under mixed precision).

    The root unit (embedders, final layer, norms) stays gathered from the forward to the end of the backward;
    blocks are gathered one at a time (plus the next one, prefetched) and resharded after use."""
    scale = 2 if precision in ("bf16", "fp16") else 4
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    blocks = [numel(b.parameters()) for b in _blocks(model)]
    return (numel(model.parameters()) - sum(blocks)) * scale, max(blocks, default=0) * scale


@dataclass(frozen=True)
class TrainSetup:
    """What a training step keeps in memory besides activations."""

    precision: str = "fp32"
    grad_checkpointing: bool = False
    ema: bool = True
    parallel: str = "ddp"  # ddp | fsdp
    world_size: int = 1
    fused_adamw: bool = True
    grad_accum_steps: int = 1


def plan_training(what: str, model: nn.Module, mode, make_inputs: Callable[[], tuple], setup: TrainSetup, *,
                  extra_frozen: Sequence[nn.Module] = (), forward: Callable | None = None,
                  exclude: Sequence[nn.Module] = ()) -> MemoryPlan:
    """The per-process plan of one optimizer step of ``model`` (fake) on the micro-batch ``make_inputs()`` gives.

    Static: fp32 weights, gradients, AdamW's two moments and the EMA, each divided by the world size under FSDP
    (full sharding; one block is gathered at a time); frozen modules (encoder, LPIPS, discriminator backbone) are
    never sharded; ``exclude``: other modules whose weights the forward uses (not activations, not counted here).
    Phases: the backward (static + the larger of saved activations and gradients, as one is freed
    while the other is written; under FSDP the gathered blocks) and the optimizer step (static + gradients + one parameter-sized temporary unless fused).
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    shard = setup.world_size if setup.parallel == "fsdp" else 1
    weights = _nbytes(params) // shard
    grads = _nbytes(trainable) // shard
    optim = 2 * _nbytes(trainable) // shard
    ema = _nbytes(params) // shard if setup.ema else 0
    frozen = sum(_nbytes(m.parameters()) + _nbytes(m.buffers()) for m in extra_frozen)
    buffers = _nbytes(model.buffers())
    act, recompute = saved_activation_bytes(model, mode, make_inputs, precision=setup.precision,
                                            grad_checkpointing=setup.grad_checkpointing, forward=forward,
                                            exclude=[*extra_frozen, *exclude])
    comps = {"weights (fp32)": weights, "buffers": buffers, "gradients (fp32)": grads, "AdamW moments": optim,
             "EMA": ema, "frozen modules": frozen, "saved activations": act}
    if recompute:
        comps["one block recomputed"] = recompute
    gathered = accumulating = 0
    notes = []
    if setup.parallel == "fsdp" and setup.world_size > 1:
        root, block = fsdp_gathered_bytes(model, setup.precision)
        gathered = root + 2 * block  # the root unit, the block in use and the one prefetched
        comps["FSDP gathered (root + 2 blocks)"] = gathered
        notes.append(f"FSDP over {setup.world_size} processes: weights, gradients, AdamW moments and EMA are "
                     f"1/{setup.world_size} each; the root unit ({root / GiB:.2f} GiB) stays gathered during the "
                     f"step, blocks ({block / GiB:.2f} GiB the largest) one at a time plus one prefetched")
        if setup.grad_accum_steps > 1:
            # set_requires_gradient_sync(False) keeps each unit's gradient whole (fp32) until the last micro-batch
            accumulating = _nbytes(trainable)
            comps["FSDP whole grads (accumulating)"] = accumulating
            notes.append("FSDP with grad_accum_steps > 1: the micro-batches before the last keep whole fp32 "
                         "gradients (no reduce-scatter until the last); grad_accum_steps=1 avoids them")
    static = weights + buffers + optim + ema + frozen
    if setup.parallel == "ddp" and setup.world_size > 1:
        notes.append("DDP with gradient_as_bucket_view: gradients live in the all-reduce buckets (no extra copy)")
    if setup.precision in ("bf16", "fp16"):
        notes.append(f"{setup.precision} autocast: the saved activations include the low-precision weight copies"
                     + (" (FSDP gathers the weights in that dtype instead: up to their size less)"
                        if gathered else ""))
    # The backward frees saved activations while it writes gradients, layer by layer from the top: the sum of the
    # two moves from ``act`` to ``grads``. Accumulated whole FSDP gradients exist before the last backward starts.
    held = act + accumulating if accumulating else max(act, grads)
    phases = {"backward": static + held + recompute + gathered,
              "optimizer step": static + grads + (0 if setup.fused_adamw else _nbytes(trainable) // shard)}
    return MemoryPlan(what, comps, phases, notes)


def plan_sampling(what: str, model: nn.Module, mode, make_inputs: Callable[[], tuple], *,
                  forward: Callable | None = None, extra: Sequence[nn.Module] = ()) -> MemoryPlan:
    """Inference: weights plus the largest set of tensors alive at once in one guided network call (measured)."""
    weights = _nbytes(model.parameters()) + _nbytes(model.buffers())
    others = sum(_nbytes(m.parameters()) + _nbytes(m.buffers()) for m in extra)
    meter = _FakeLiveMeter()
    model.eval()
    with mode, torch.no_grad(), meter:
        args = make_inputs()
        (forward or model)(*args)
    comps = {"stage-2 weights": weights, "other models (guide, decoder)": others,
             "activations (peak live)": meter.peak}
    return MemoryPlan(what, comps, {"sampling step": weights + others + meter.peak})


# ----------------------------------------------------------------------------------------------------------------
# Measuring live tensors


class LiveTensorMeter:
    """Peak bytes of live CPU tensor storages allocated while active (a ``TorchDispatchMode``).

    Each new output storage of an op is counted until it is freed; storages shared with an op's inputs (views,
    in-place results) are not new. Tensors that existed before entering are not counted.
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._mode = None

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, out, inputs) -> None:
        from torch.utils._pytree import tree_flatten

        taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key and key not in taken and key not in self._live:
                self._live[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._track(out, tree_flatten((args, kwargs))[0])
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


class _FakeLiveMeter(LiveTensorMeter):
    """The same count on fake tensors (storages are keyed by object, freed when the fake storage dies)."""

    def _track(self, out, inputs) -> None:
        from torch.utils._pytree import tree_flatten

        taken = {id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key not in taken and key not in self._live:
                self._live[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)

    def __enter__(self):
        # Inside the fake mode the dispatch mode must sit below it: push ours, then the caller's fake mode runs.
        return super().__enter__()


@contextlib.contextmanager
def measured_peak():
    """``with measured_peak() as m: ...`` then ``m.peak`` (bytes of live CPU tensors at the worst moment)."""
    meter = LiveTensorMeter()
    with meter:
        yield meter


# ----------------------------------------------------------------------------------------------------------------
# The commands' plans (``--dry-run``)


def _world_size(world_size: int | None) -> int:
    import os

    return int(world_size or os.environ.get("WORLD_SIZE", "1"))


def latent_shape_of(rae_cfg) -> tuple[int, int, int]:
    """(C, h, w) of an RAE config's latents without weights: encoder width × (input / patch)²."""
    from rae_cli.probe import encoder_geometry

    width, patch = encoder_geometry(rae_cfg)
    side = rae_cfg.encoder_input_size // patch
    return int(width), int(side), int(side)


def _dit_inputs(batch: int, shape) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, *shape), torch.rand(batch), torch.zeros(batch, dtype=torch.long))


def plan_train_dit(cfg, world_size: int | None = None) -> MemoryPlan:
    """The plan of ``rae train-dit`` with config ``cfg`` on ``world_size`` processes (default: $WORLD_SIZE or 1)."""
    from rae_cli.build import build_dit_model

    world = _world_size(world_size)
    shape = tuple(cfg.latent_shape) if cfg.latent_shape else latent_shape_of(cfg.rae)
    num_classes = cfg.num_classes or 1000
    per_rank = cfg.global_batch_size // world
    micro = max(1, per_rank // cfg.grad_accum_steps)
    model, mode = build_fake(lambda: build_dit_model(cfg.dit, shape, num_classes))
    setup = TrainSetup(precision=cfg.precision, grad_checkpointing=bool(getattr(cfg.dit, "grad_checkpointing", False)),
                       parallel=getattr(cfg, "parallel", "ddp"), world_size=world, fused_adamw=cfg.optim.fused,
                       grad_accum_steps=cfg.grad_accum_steps)
    what = (f"train-dit {cfg.dit.name} on {list(shape)} latents, {world} process(es) "
            f"({setup.parallel if world > 1 else 'one process'}), micro-batch {micro} "
            f"({cfg.grad_accum_steps} per step), {cfg.precision}")
    plan = plan_training(what, model, mode, _dit_inputs(micro, shape), setup)
    if world == 1 and micro >= 256:
        plan.notes.append(f"planned for ONE process (WORLD_SIZE unset): it takes the whole global batch of "
                          f"{cfg.global_batch_size}; for N GPUs plan with WORLD_SIZE=N (torchrun sets it), or add "
                          f"grad_accum_steps=K / dit.grad_checkpointing=true / precision=bf16")
    if cfg.images:
        plan.notes.append("on-the-fly encoding: add the frozen encoder's weights and one micro-batch of its "
                          "activations (no gradient)")
    return plan


def plan_sample(cfg, stage2_cfg=None) -> MemoryPlan:
    """The plan of ``rae sample``: the stage-2 model (and guide) at the batch size, CFG doubling the batch."""
    from rae_cli.build import build_dit_model

    dit_cfg = cfg.dit or (stage2_cfg.dit if stage2_cfg is not None else None)
    if dit_cfg is None:
        raise ValueError("the memory plan needs the stage-2 architecture: pass dit=<preset> or a checkpoint folder")
    rae_cfg = cfg.rae or (stage2_cfg.rae if stage2_cfg is not None else None)
    shape = tuple(cfg.latent_shape or (stage2_cfg.latent_shape if stage2_cfg is not None and stage2_cfg.latent_shape
                                       else latent_shape_of(rae_cfg)))
    num_classes = cfg.num_classes or (stage2_cfg.num_classes if stage2_cfg is not None else None) or 1000
    rows = cfg.batch_size * (2 if cfg.guidance.active else 1)  # guided: conditional and unconditional halves
    model, mode = build_fake(lambda: build_dit_model(dit_cfg, shape, num_classes))
    extra = []
    if cfg.guidance.active and cfg.guidance.method == "autoguidance" and cfg.guidance.guide_dit is not None:
        guide, _ = build_fake(lambda: build_dit_model(cfg.guidance.guide_dit, shape, num_classes))
        extra.append(guide)
    what = f"sample {dit_cfg.name}, batch {cfg.batch_size} ({rows} rows per network call), {cfg.dtype}"
    plan = plan_sampling(what, model, mode, _dit_inputs(rows, shape), extra=extra)
    if cfg.decode:
        plan.notes.append("decoding adds the RAE decoder's weights and one batch of its activations")
    return plan


def plan_sample_command(cfg) -> MemoryPlan:
    """:func:`plan_sample` with the architecture read from a checkpoint folder's config.yaml when not given."""
    from pathlib import Path

    stage2_cfg = None
    if cfg.dit is None and cfg.checkpoint and Path(cfg.checkpoint).exists():
        from rae_cli.config import load_resolved
        from rae_cli.run_dir import CONFIG_FILE, resolve_checkpoint
        from rae_cli.train_dit import TrainDiTConfig

        stage2_cfg = load_resolved(TrainDiTConfig, resolve_checkpoint(cfg.checkpoint).path / CONFIG_FILE)
    return plan_sample(cfg, stage2_cfg)
