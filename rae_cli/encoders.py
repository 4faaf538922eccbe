"""Frozen representation encoders returning LayerNorm-standardized patch tokens (paper §3, spec §1.2).

Each encoder maps normalized pixels (B, 3, H, W) to tokens (B, N, C) in row-major (h, w) order. The
backbone's final LayerNorm loses its affine parameters (as the official wrappers do), so every token is
standardized over its C channels; CLS / register tokens are dropped. Pixel resizing and (x − mean)/std
belong to the RAE (``rae_cli.rae``); ``image_mean`` / ``image_std`` here say which constants to use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

# The encoder modules live in rae_cli.encoder_models; their names are re-exported here, where they always were.
from rae_cli.encoder_models import (  # noqa: F401
    _EFFNET_BLOCKS_PER_STAGE, EFFNET_STAGES, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, DINOv2Encoder,
    EfficientNetLite0Encoder, EncoderInfo, FrozenEncoder, MAEEncoder, SigLIP2Encoder, _effnet_package_to_timm,
    _nonaffine_layernorm, efficientnet_lite0_classifier)
from rae_cli.weights import WeightsNotFoundError, get_artifact, is_offline, local_encoder_dir, resolve  # noqa: F401

log = logging.getLogger(__name__)
RANDOM_INIT_WARNING = "RANDOM-INIT encoder (test only, not pretrained)"


# ---------------------------------------------------------------------------------------------------
# Registry: the paper's encoders, with their architectures so a random-init test build needs no download.


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: its family, the input size RAE feeds it, and its HF config (for offline random init)."""

    family: str  # "dinov2" | "siglip2" | "mae" | "efficientnet-lite0"
    input_size: int
    config: dict[str, Any] = field(default_factory=dict)


_DINOV2 = dict(model_type="dinov2_with_registers", num_hidden_layers=12, mlp_ratio=4, patch_size=14,
               image_size=518, num_register_tokens=4, layer_norm_eps=1e-6, layerscale_value=1.0,
               hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0)

ENCODERS: dict[str, EncoderSpec] = {
    "dinov2-b": EncoderSpec("dinov2", 224, {**_DINOV2, "hidden_size": 768, "num_attention_heads": 12}),
    "dinov2-s": EncoderSpec("dinov2", 224, {**_DINOV2, "hidden_size": 384, "num_attention_heads": 6}),
    "dinov2-l": EncoderSpec("dinov2", 224, {**_DINOV2, "hidden_size": 1024, "num_attention_heads": 16,
                                            "num_hidden_layers": 24}),
    "dinov2-b-noreg": EncoderSpec("dinov2", 224, {**_DINOV2, "model_type": "dinov2", "hidden_size": 768,
                                                  "num_attention_heads": 12, "num_register_tokens": 0}),
    "siglip2-b": EncoderSpec("siglip2", 256, dict(
        model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, image_size=256, patch_size=16, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh")),
    "mae-b": EncoderSpec("mae", 256, dict(
        model_type="vit_mae", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, image_size=224, patch_size=16, layer_norm_eps=1e-12, hidden_act="gelu",
        qkv_bias=True)),
    "efficientnet-lite0": EncoderSpec("efficientnet-lite0", 256),
}
FAMILIES = ("dinov2", "siglip2", "mae", "efficientnet-lite0")


# ---------------------------------------------------------------------------------------------------
# Loading


def _read_preprocessor(source: str) -> dict[str, Any]:
    """The HF preprocessor_config.json of a local folder or of a cached hub repo ({} if none; no network)."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "preprocessor_config.json")
        except Exception:  # not a valid repo id, or no cache
            found = None
        if not isinstance(found, str):
            return {}
        path = Path(found)
    return json.loads(path.read_text())


def _pixel_stats(source: str | None, family: str) -> tuple[tuple, tuple]:
    default = (SIGLIP_MEAN, SIGLIP_STD) if family == "siglip2" else (IMAGENET_MEAN, IMAGENET_STD)
    pre = _read_preprocessor(source) if source else {}
    mean, std = pre.get("image_mean", default[0]), pre.get("image_std", default[1])
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _not_found(source: str, name: str | None, network_error: Exception | None = None) -> WeightsNotFoundError:
    if Path(source).exists():
        where = f"the folder {source} is not a complete Hugging Face model folder (config.json + model.safetensors)"
    else:
        where = f"model {source!r} is not in the Hugging Face cache"
    if network_error is not None:
        where += f" and downloading it failed ({type(network_error).__name__}: {str(network_error)[:300]})"
    elif is_offline():
        where += " and offline mode (HF_HUB_OFFLINE) is set, so nothing was downloaded"
    if name:
        how = (f"Run `rae download {name}` while online (fills the Hugging Face cache), or put a Hugging Face "
               f"save_pretrained copy (config.json, model.safetensors, preprocessor_config.json) at "
               f"{local_encoder_dir(name)}, where it is picked up automatically.")
    else:
        how = (f"Download {source!r} while online (e.g. `huggingface-cli download {source}`), or pass a local "
               "save_pretrained folder (config.json, model.safetensors, preprocessor_config.json) as the source.")
    return WeightsNotFoundError(f"encoder weights not found: {where}. {how}")


def _hf_load(load: Callable[..., Any], source: str, name: str | None) -> Any:
    """Call a HF ``from_pretrained``-like ``load(source, local_files_only=...)``: cache/local first,
    the network only when online and ``source`` is a hub id."""
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise _not_found(source, name)
    try:
        return load(source, local_files_only=True)
    except OSError as e:
        first = e
    if Path(source).exists() or is_offline():
        raise _not_found(source, name) from first
    try:
        return load(source, local_files_only=False)
    except Exception as e:  # network errors come in many types
        raise _not_found(source, name, e) from e


def _check_loaded(info: Mapping[str, Any], source: str, allowed_missing: tuple[str, ...] = ()) -> None:
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(allowed_missing)]
    if missing:
        raise WeightsNotFoundError(
            f"loading {source!r} left weights uninitialized ({', '.join(sorted(missing)[:8])}): "
            "the checkpoint does not match the expected architecture")


def _hf_model_class(family: str, model_type: str) -> type:
    import transformers

    if family == "dinov2":
        if model_type == "dinov2_with_registers":
            return transformers.Dinov2WithRegistersModel
        if model_type == "dinov2":
            return transformers.Dinov2Model
    elif family == "siglip2":
        if model_type in ("siglip", "siglip_vision_model"):
            return transformers.SiglipVisionModel
    elif family == "mae":
        if model_type == "vit_mae":
            return transformers.ViTMAEForPreTraining  # the official path: the pretraining model's ``.vit``
    raise ValueError(f"a {family} encoder cannot be built from a config of model_type {model_type!r}"
                     + (" (only the fixed-resolution 'siglip' SigLIP2 checkpoints are supported)"
                        if family == "siglip2" else ""))


def _config_from_dict(family: str, cfg: dict[str, Any]):
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    cls = {"dinov2_with_registers": transformers.Dinov2WithRegistersConfig, "dinov2": transformers.Dinov2Config,
           "siglip_vision_model": transformers.SiglipVisionConfig, "vit_mae": transformers.ViTMAEConfig}[model_type]
    if model_type == "dinov2":
        cfg.pop("num_register_tokens", None)
    return cls(**cfg)


def _wrap(family: str, model: nn.Module, mean, std) -> FrozenEncoder:
    if family == "dinov2":
        return DINOv2Encoder(model, mean, std)
    if family == "siglip2":
        return SigLIP2Encoder(model, mean, std)
    if family == "mae":
        return MAEEncoder(getattr(model, "vit", model), mean, std)
    raise ValueError(f"unknown encoder family {family!r}")  # pragma: no cover


def load_encoder(kind: str, source: str | None = None, *, random_init: bool = False,
                 config_overrides: Mapping[str, Any] | None = None, stride: int = 8,
                 seed: int = 0) -> FrozenEncoder:
    """Build a frozen encoder.

    kind:   a registry name (``"dinov2-b"``, ``"siglip2-b"``, ``"mae-b"``, ``"efficientnet-lite0"`` …, see
            ``ENCODERS``) or a family (``"dinov2"``, ``"siglip2"``, ``"mae"``) together with ``source``.
    source: a HF hub id or a local ``save_pretrained`` folder (for EfficientNet: a ``.pth`` file). Default:
            ``$RAE_HOME/encoders/<name>`` if present, else the registry's hub id. The HF cache is always
            tried first (``local_files_only=True``); the network is used only when not offline.
    random_init: build from the config only (the registry's, or ``source``'s if it is a local folder) with
            seeded random weights, for CPU tests; ``config_overrides`` shrinks it (e.g. ``hidden_size``).
    stride: EfficientNet-Lite0 only: which stage's feature map to return (2, 4, 8, 16 or 32).

    Raises ``WeightsNotFoundError`` (what to download and where) when the weights are not available.
    """
    name, spec, family = _lookup(kind, source, random_init)
    if source is not None and not random_init:
        from rae_cli.diffusers_rae import build_encoder as diffusers_encoder, is_diffusers_folder

        if is_diffusers_folder(source):  # the encoder stored inside a diffusers AutoencoderRAE (rae.source)
            return diffusers_encoder(source, kind)
    if family == "efficientnet-lite0":
        if config_overrides:
            raise ValueError("config_overrides is not supported for EfficientNet-Lite0")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = efficientnet_lite0_classifier(source, random_init=random_init)
        encoder = EfficientNetLite0Encoder(classifier, stride)
    elif random_init:
        encoder = _random_init_hf(family, spec, source, config_overrides, seed)
    else:
        if config_overrides:
            raise ValueError("config_overrides only applies to random_init=True")
        if source is None:
            local = local_encoder_dir(name)
            source = str(local) if (local / "config.json").is_file() else get_artifact(name).source
        encoder = _pretrained_hf(family, source, name)
    encoder.name = name or f"{family}:{source}"
    if random_init:
        encoder.is_random_init = True
        log.warning("%s: %s", RANDOM_INIT_WARNING, encoder.name)
    return encoder


def _lookup(kind: str, source: str | None, random_init: bool) -> tuple[str | None, EncoderSpec | None, str]:
    """(registry name or None, its spec or None, family) of an encoder ``kind``."""
    if kind in ENCODERS:
        return kind, ENCODERS[kind], ENCODERS[kind].family
    if kind in FAMILIES:
        if source is None and not (random_init and kind == "efficientnet-lite0"):
            raise ValueError(f"encoder family {kind!r} needs a source (hub id or folder); "
                             f"or use a registry name: {', '.join(ENCODERS)}")
        return None, None, kind
    raise KeyError(f"unknown encoder {kind!r}; registry names: {', '.join(ENCODERS)}; "
                   f"families (with a source): {', '.join(FAMILIES)}")


def encoder_info(kind: str, source: str | None = None, *, random_init: bool = False,
                 config_overrides: Mapping[str, Any] | None = None, stride: int = 8, seed: int = 0) -> EncoderInfo:
    """Width, patch size and pixel constants of the encoder ``load_encoder`` (same arguments) would build, without
    its weights: the architecture is built on the meta device from its config alone (a few ms, no memory).

    Used when latents are only decoded (``rae sample``). Reads config files, never weights; a registry encoder
    whose config is neither in ``$RAE_HOME`` nor in the Hugging Face cache uses the registry's architecture.
    """
    del seed  # same signature as load_encoder; nothing random happens on the meta device
    name, _, family = _lookup(kind, source, random_init)
    if source is not None and not random_init:
        from rae_cli.diffusers_rae import encoder_info as diffusers_info, is_diffusers_folder

        if is_diffusers_folder(source):
            return diffusers_info(source, kind)
    with torch.device("meta"):
        encoder = encoder_architecture(kind, source, random_init=random_init, config_overrides=config_overrides,
                                       stride=stride)
    if source is None and name is not None and not random_init:
        local = local_encoder_dir(name)
        source = str(local) if (local / "config.json").is_file() else get_artifact(name).source
    return dataclasses.replace(encoder.info(), name=name or f"{family}:{source}")


def encoder_architecture(kind: str, source: str | None = None, *, random_init: bool = False,
                         config_overrides: Mapping[str, Any] | None = None, stride: int = 8) -> FrozenEncoder:
    """The encoder ``load_encoder`` (same arguments) would build, from its config alone: no weights are read.

    Call it under ``torch.device("meta")`` or a ``FakeTensorMode`` (the memory planner); its parameters are then
    shapes only. A registry encoder whose config is in neither ``$RAE_HOME`` nor the HF cache uses the registry's.
    """
    name, spec, family = _lookup(kind, source, random_init)
    if source is not None and not random_init:
        from rae_cli.diffusers_rae import encoder_architecture as diffusers_architecture, is_diffusers_folder

        if is_diffusers_folder(source):
            return diffusers_architecture(source, kind)
    if family == "efficientnet-lite0":
        if config_overrides:
            raise ValueError("config_overrides is not supported for EfficientNet-Lite0")
        return EfficientNetLite0Encoder(efficientnet_lite0_classifier(None, random_init=True), stride)
    if random_init:
        return _random_init_hf(family, spec, source, config_overrides, 0)
    if config_overrides:
        raise ValueError("config_overrides only applies to random_init=True")
    if source is None:
        local = local_encoder_dir(name)
        source = str(local) if (local / "config.json").is_file() else get_artifact(name).source
    return _hf_architecture(family, source, name, spec)


def _hf_architecture(family: str, source: str, name: str | None, spec: EncoderSpec | None) -> FrozenEncoder:
    """The pretrained encoder's architecture from its config.json (local folder or HF cache; no network), else
    the registry's; call under ``torch.device("meta")``."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        if spec is None:
            raise _not_found(source, name) from None
        config = _config_from_dict(family, dict(spec.config))
    if family == "siglip2" and config.model_type == "siglip":
        config = config.vision_config
    mean, std = _pixel_stats(source, family)
    return _encoder_from_hf_config(family, config, 0, mean, std)


def _pretrained_hf(family: str, source: str, name: str | None) -> FrozenEncoder:
    import transformers

    config = _hf_load(lambda s, **kw: transformers.AutoConfig.from_pretrained(s, **kw), source, name)
    if family == "siglip2" and config.model_type == "siglip":
        config = config.vision_config  # a full SigLIP (text + vision) repo: keep the vision tower's config
    if family == "mae":
        config.mask_ratio = 0.0
    cls = _hf_model_class(family, config.model_type)
    # A full SigLIP repo also holds the text tower and MAE its pixel decoder: "unexpected" keys are expected,
    # so transformers' load report is silenced; missing keys are checked below instead.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = _hf_load(lambda s, **kw: cls.from_pretrained(
            s, config=config, dtype=torch.float32, output_loading_info=True, **kw), source, name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # The MAE pixel decoder is not used; everything the encoder runs must have been loaded.
    _check_loaded(info, source, allowed_missing=("decoder.",) if family == "mae" else ())
    mean, std = _pixel_stats(source, family)
    return _wrap(family, model, mean, std)


def _random_init_hf(family: str, spec: EncoderSpec | None, source: str | None,
                    overrides: Mapping[str, Any] | None, seed: int) -> FrozenEncoder:
    import transformers

    if source is not None and (Path(source) / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        if family == "siglip2" and config.model_type == "siglip":
            config = config.vision_config
        for k, v in (overrides or {}).items():
            setattr(config, k, v)
    elif spec is not None:
        config = _config_from_dict(family, {**spec.config, **(overrides or {})})
    else:
        raise ValueError(f"random_init for family {family!r} needs a registry name or a local folder with config.json")
    mean, std = _pixel_stats(source, family)
    return _encoder_from_hf_config(family, config, seed, mean, std)


def _encoder_from_hf_config(family: str, config: Any, seed: int, mean, std) -> FrozenEncoder:
    import transformers

    if family == "mae":
        config.mask_ratio = 0.0
        cls = transformers.ViTMAEModel  # no pixel decoder needed when nothing is loaded
    else:
        cls = _hf_model_class(family, config.model_type)
    with torch.random.fork_rng(devices=[]):  # deterministic, and leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = cls(config)
    return _wrap(family, model, mean, std)


def encoder_from_config(kind: str, config_overrides: Mapping[str, Any] | None = None, *,
                        image_mean=None, image_std=None) -> FrozenEncoder:
    """The architecture of registry encoder ``kind`` (sizes changed by ``config_overrides``), weights still to be
    loaded by the caller (e.g. from a diffusers ``AutoencoderRAE`` file). Not marked random-init: the caller must
    load every weight strictly (``load_official_state_dict``)."""
    spec = ENCODERS[kind]
    if spec.family not in ("dinov2", "siglip2", "mae"):
        raise ValueError(f"{kind!r} is not a transformers encoder")
    config = _config_from_dict(spec.family, {**spec.config, **(config_overrides or {})})
    default_mean, default_std = _pixel_stats(None, spec.family)
    encoder = _encoder_from_hf_config(spec.family, config, 0, image_mean or default_mean, image_std or default_std)
    encoder.name = kind
    return encoder


def hf_config_of(encoder: FrozenEncoder) -> dict[str, Any]:
    """The transformers config (as a dict) of a DINOv2 / SigLIP2 / MAE encoder's backbone."""
    inner = getattr(encoder, "encoder", None) if isinstance(encoder, DINOv2Encoder) else getattr(encoder, "model")
    return inner.config.to_dict()
