"""Rebuild a stage-2 model (and an AutoGuidance guide) from what a user points at (spec §3.3, §6, §1.6).

Accepted sources, told apart by what is on disk:
- one of our checkpoint folders: ``step-*/`` with ``config.yaml`` + ``ema.safetensors`` / ``model.safetensors``, a
  train-dit run folder (→ its latest checkpoint), or a folder written by :func:`convert_official`;
- an official ``stage2_model.pt``: a raw state dict, ``{"ema": …}``, or a training checkpoint
  ``{"model", "ema", "optimizer", …}`` (read by :mod:`rae_cli.official`, ``weights_only=True``), loaded strictly;
- a released artifact name (``ditdh-xl-256``, …) looked up by :mod:`rae_cli.weights`.
Official files carry no config: the DiT section names the architecture; the latent shape and class count are read
off the weights (``x_embedder`` / ``pos_embed`` / label table) unless given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from rae_cli.checkpoint import CheckpointError
from rae_cli.config import ConfigError
from rae_cli.schema import DiTConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}
SECTIONS = ("rae", "dit", "flow")  # config sections a sample run takes from a checkpoint folder


@dataclass
class Stage2Model:
    model: torch.nn.Module  # eval mode, on the requested device
    dit: DiTConfig
    latent_shape: tuple[int, int, int]
    num_classes: int
    source: str  # what was loaded, for logs and sample_info.json


# ---------------------------------------------------------------------------------------------- our folders


def checkpoint_dir(path: str | Path) -> Path | None:
    """The checkpoint folder ``path`` stands for (itself, or a run's latest), or None if it is not a folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in WEIGHT_FILES.values()):
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            from rae_cli.run_dir import latest_checkpoint

            ckpt = latest_checkpoint(root)
            if ckpt is not None:
                return ckpt.path
    raise CheckpointError(f"{path} is a folder but holds no checkpoint ({CONFIG_FILE} + ema/model.safetensors, or "
                          "checkpoints/step-*/)")


def checkpoint_base(checkpoint: str | None) -> dict:
    """Config values a checkpoint folder supplies (rae, dit, flow, latent_shape, num_classes); {} for files."""
    if not checkpoint:
        return {}
    folder = checkpoint_dir(checkpoint)
    if folder is None:
        return {}
    from rae_cli.config import read_yaml

    data = read_yaml(folder / CONFIG_FILE)
    base = {k: data[k] for k in SECTIONS if isinstance(data.get(k), Mapping)}
    if "dit" not in base:
        raise CheckpointError(f"{folder / CONFIG_FILE} has no 'dit' section: cannot tell the model architecture")
    shape, classes = data.get("latent_shape"), data.get("num_classes")  # written by train-dit and convert-dit
    if shape is None or classes is None:  # read off the weights' shapes (the safetensors header; no tensor data)
        shapes = _safetensors_shapes(_weights_file(folder, "ema"))
        dit = _dit_config(base["dit"])
        shape = shape if shape is not None else infer_latent_shape(shapes, dit.patch_size)
        classes = classes if classes is not None else infer_num_classes(shapes, dit.class_dropout_prob)
    base["latent_shape"] = [int(d) for d in shape]
    base["num_classes"] = int(classes)
    base["checkpoint"] = str(folder)
    if isinstance(base.get("rae"), Mapping):  # a train-dit checkpoint carries the statistics it was trained with
        from rae_cli.stage2_bundle import own_stats

        base["rae"] = {**base["rae"], "stats": own_stats(folder, base["rae"].get("stats"))}
    return base


class _Shape:
    """Stands in for a tensor when only its shape is known (``.shape``, ``.dim()``)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def dim(self) -> int:
        return len(self.shape)


def _safetensors_shapes(path: Path) -> dict[str, _Shape]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------------------------------------- official files


def _official_path(value: str) -> Path:
    from rae_cli.build import resolve_weights_path

    path = resolve_weights_path(value)
    if path is None or path.is_dir():
        raise CheckpointError(f"{value}: expected a stage-2 weights file")
    return path


def infer_latent_shape(state_dict: Mapping[str, torch.Tensor], patch_size: int = 1) -> tuple[int, int, int]:
    """(C, h, w) from the weights: C from the patch-embed conv (D, C, p, p), h = w from the token count of the
    position embedding (1, N, D) or the RoPE tables (N, head_dim)."""
    w = state_dict.get("x_embedder.proj.weight")
    if w is None or w.dim() != 4:
        raise CheckpointError("cannot read the latent channels off these weights (no x_embedder.proj.weight); "
                              "set latent_shape=[C,h,w]")
    channels, p = int(w.shape[1]), int(w.shape[-1])
    for key in ("pos_embed", "enc_feat_rope.freqs_cos", "feat_rope.freqs_cos"):
        if key in state_dict:
            tokens = int(state_dict[key].shape[-2])
            side = math.isqrt(tokens)
            if side * side == tokens:
                return channels, side * p, side * p
    raise CheckpointError("cannot read the latent size off these weights (no pos_embed or RoPE tables); "
                          "set latent_shape=[C,h,w]")


def infer_num_classes(state_dict: Mapping[str, torch.Tensor], class_dropout_prob: float) -> int:
    """Rows of the label table, minus the null row that exists when the model was built with label dropout."""
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is None:
        raise CheckpointError("cannot read the class count off these weights; set num_classes=...")
    return int(table.shape[0]) - int(class_dropout_prob > 0)


# ---------------------------------------------------------------------------------------------- loading


def _dit_config(value: Any) -> DiTConfig:
    if isinstance(value, DiTConfig):
        return value
    from rae_cli.config import resolve

    return resolve(DiTConfig, base=dict(value))


def _weights_file(folder: Path, weights: str) -> Path:
    """``<weights>.safetensors`` in ``folder``, falling back (with a warning) to the other one."""
    for name in [weights] + [w for w in WEIGHT_FILES if w != weights]:
        f = folder / WEIGHT_FILES[name]
        if f.is_file():
            if name != weights:
                log.warning("%s has no %s; using %s", folder, WEIGHT_FILES[weights], WEIGHT_FILES[name])
            return f
    raise CheckpointError(f"{folder} has neither {' nor '.join(WEIGHT_FILES.values())}")


def _our_weights(folder: Path, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    from rae_cli.checkpoint import load_safetensors

    f = _weights_file(folder, weights)
    tensors, _ = load_safetensors(f)
    return tensors, str(f)


def build_stage2(source: str | None, dit: Any, *, latent_shape=None, num_classes: int | None = None,
                 weights: str = "ema", random_init: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", what: str = "stage-2 model") -> Stage2Model:
    """Build and load a stage-2 model from ``source`` (see the module docstring), strictly, in eval mode.

    ``dit`` (DiTConfig or mapping) is required unless ``source`` is one of our folders. ``latent_shape`` and
    ``num_classes`` default to the folder's config, else to what the weights say. ``random_init`` (tests only)
    builds the architecture with random weights and needs both.
    """
    from rae_cli.build import build_dit_model

    state_dict, desc = None, "random init (TEST ONLY)"
    folder = checkpoint_dir(source) if source else None
    if folder is not None:
        base = checkpoint_base(str(folder))
        dit = dit if dit is not None else base["dit"]
        latent_shape = latent_shape or base.get("latent_shape")
        num_classes = num_classes if num_classes is not None else base.get("num_classes")
        state_dict, desc = _our_weights(folder, weights)
    elif source:
        from rae_cli.official import load_stage2_state_dict

        path = _official_path(source)
        state_dict = load_stage2_state_dict(path, prefer=weights)  # weights_only=True; raw / {"ema"} / training
        desc = str(path)
    elif not random_init:
        raise ConfigError(f"no {what} given: set checkpoint=... (one of our checkpoint folders, an official "
                          "stage2_model.pt, or a released name such as ditdh-xl-256; see `rae presets sample`)"
                          if what == "stage-2 model" else f"no {what} given")
    if dit is None:
        raise ConfigError(f"the {what} {source} is an official file without a config: name its architecture "
                          "(dit=<preset> or dit.name=DiT-DH-XL ...)")
    dit = _dit_config(dit)
    if state_dict is not None:
        if latent_shape is None:
            latent_shape = infer_latent_shape(state_dict, dit.patch_size)
        if num_classes is None:
            num_classes = infer_num_classes(state_dict, dit.class_dropout_prob)
    if latent_shape is None or num_classes is None:
        raise ConfigError(f"the {what} needs latent_shape=[C,h,w] and num_classes=...")
    latent_shape = tuple(int(d) for d in latent_shape)
    if state_dict is not None:  # built on the meta device, materialised by the load: no random init thrown away
        model = build_dit_model(dit, latent_shape, int(num_classes), state_dict=state_dict, what=f"{what} {desc}")
    else:
        torch.manual_seed(seed)
        model = build_dit_model(dit, latent_shape, int(num_classes))
        log.warning("!!! %s: RANDOM weights (dit_random_init, TEST ONLY): the images mean nothing !!!", what)
    model = model.to(device).eval().requires_grad_(False)
    log.info("%s: %s (%s, latents %s, %d classes)", what, desc, dit.name, latent_shape, num_classes)
    return Stage2Model(model=model, dit=dit, latent_shape=latent_shape, num_classes=int(num_classes), source=desc)


def load_stage2(cfg, device: str | torch.device = "cpu") -> Stage2Model:
    """The main model of a :class:`rae_cli.sample.SampleConfig`."""
    latent_shape = cfg.latent_shape
    if latent_shape is None and cfg.dit_random_init and cfg.rae is not None:
        latent_shape = _rae_latent_shape(cfg.rae)
    return build_stage2(cfg.checkpoint, cfg.dit, latent_shape=latent_shape, num_classes=cfg.num_classes,
                        weights=cfg.weights, random_init=cfg.dit_random_init, seed=cfg.seed, device=device)


def load_guide(cfg, main: Stage2Model, device: str | torch.device = "cpu") -> Stage2Model:
    """The AutoGuidance guide of a SampleConfig: same latent shape and classes as ``main``, checked."""
    g = cfg.guidance
    guide = build_stage2(g.guide_checkpoint, g.guide_dit, weights=g.guide_weights, device=device,
                         what="guide model")
    if guide.latent_shape != main.latent_shape or guide.num_classes != main.num_classes:
        raise ConfigError(f"the guide model works on latents {guide.latent_shape} with {guide.num_classes} classes, "
                          f"the main model on {main.latent_shape} with {main.num_classes}: they must agree")
    return guide


def _rae_latent_shape(rae_cfg) -> tuple[int, int, int]:
    """Latent shape of an RAE config without building either half: encoder width × (input / patch)²."""
    from rae_cli.build import encoder_info

    enc = encoder_info(rae_cfg)
    side = rae_cfg.encoder_input_size // enc.patch_size
    return int(enc.hidden_size), side, side


# ---------------------------------------------------------------------------------------------- conversion


def convert_official(source: str, dit: Any, out_dir: str | Path, *, latent_shape=None,
                     num_classes: int | None = None, weights: str = "ema",
                     extra_config: Mapping[str, Any] | None = None) -> Path:
    """Official stage-2 file → one of our checkpoint folders: ``model.safetensors`` + ``config.yaml``.

    The weights are loaded into the model first (strictly), so a converted folder always loads. ``extra_config``
    (e.g. ``{"rae": {...}, "flow": {...}}``) is stored in config.yaml so that ``rae sample checkpoint=OUT``
    needs no more settings.
    """
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from rae_cli import __version__
    from rae_cli.checkpoint import atomic_write_text, save_safetensors

    loaded = build_stage2(source, dit, latent_shape=latent_shape, num_classes=num_classes, weights=weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / WEIGHT_FILES["model"], loaded.model.state_dict(),
                     metadata={"converted_from": loaded.source, "rae_version": __version__})
    config = {"rae_version": __version__, "converted_from": loaded.source, **dict(extra_config or {}),
              "dit": asdict(loaded.dit), "latent_shape": list(loaded.latent_shape),
              "num_classes": loaded.num_classes}
    atomic_write_text(out_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)))
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Reading a trained model back


def load_trained_dit(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
                     ) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, its resolved TrainDiTConfig) from a train-dit checkpoint or run folder (latest checkpoint).

    The config carries everything a sampler needs: ``rae`` (with the statistics used: the checkpoint's own copy
    when it has one), ``dit``, ``flow.shift``, ``num_classes`` and ``latent_shape``.
    """
    import dataclasses

    from rae_cli.build import build_dit_model
    from rae_cli.config import load_resolved
    from rae_cli.run_dir import CONFIG_FILE, resolve_checkpoint
    from rae_cli.stage2_bundle import own_stats
    from rae_cli.train_dit_config import TrainDiTConfig

    ck = resolve_checkpoint(path)
    cfg = load_resolved(TrainDiTConfig, ck.path / CONFIG_FILE)
    cfg = dataclasses.replace(cfg, rae=dataclasses.replace(cfg.rae, stats=own_stats(ck.path, cfg.rae.stats)))
    # Built on the meta device and materialised by the load (a MeanFlow teacher, a sampler's model).
    model = build_dit_model(cfg.dit, cfg.latent_shape, cfg.num_classes, state_dict=ck.weights(weights),
                            what=f"{weights} weights {ck.path}")
    return model.to(device).eval(), cfg
