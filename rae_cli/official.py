"""Official checkpoint formats (spec §1.5-1.6, parity README "official_format"): load, convert, export.

The released files are ``torch.save`` pickles: decoder ``model.pt`` (a raw ``GeneralDecoder`` state dict),
``stat.pt`` (``{"mean", "var"}``) and stage-2 ``stage2_model.pt`` (a raw state dict, or a training checkpoint
``{"step","epoch","model","ema",...}`` whose ``ema`` is preferred). Everything is read with
``weights_only=True``, loaded strictly (errors name missing/unexpected keys), and converted to our
safetensors layout: the same keys, plus JSON metadata sufficient to rebuild the model without a config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from rae_cli.checkpoint import (CheckpointError, load_safetensors, save_safetensors, save_torch_atomic,
                                strict_load, strip_prefixes, torch_load_weights)
from rae_cli.decoder import DECODER_SIZES, ViTDecoder, decoder_arch_from_hf_config
from rae_cli.latent_stats import load_stats, save_stats

log = logging.getLogger(__name__)

DECODER_FORMAT = "rae-decoder-v1"
STAGE2_FORMAT = "rae-stage2-weights-v1"
ARCH_KEYS = ("latent_dim", "hidden_size", "depth", "num_heads", "intermediate_size", "patch_size", "num_patches")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, path: str | os.PathLike, *, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """A raw state dict from a raw state dict or a training checkpoint (``ema`` preferred, else ``model``),
    with DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes removed."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    if _is_state_dict(obj):
        return strip_prefixes(obj)
    if isinstance(obj, Mapping):
        order = (prefer, "model" if prefer == "ema" else "ema")
        for key in order:
            if _is_state_dict(obj.get(key)):
                if key == "model":
                    log.warning("%s: using the non-EMA 'model' weights%s", path,
                                "" if prefer == "model" else " (no 'ema' entry)")
                return strip_prefixes(obj[key])
        raise CheckpointError(f"{path} is neither a state dict nor a checkpoint with an 'ema' or 'model' "
                              f"state dict (top-level keys: {sorted(map(str, obj))[:10]})")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")


# ---------------------------------------------------------------------------------------------------
# Decoder


def load_official_decoder_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The decoder state dict of a released ``model.pt`` (raw), or of a full stage-1 RAE checkpoint
    (keys under ``decoder.``, ``ema`` preferred), or of our decoder safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    sd = unwrap_state_dict(torch_load_weights(path), path)
    if "decoder_embed.weight" not in sd and any(k.startswith("decoder.") for k in sd):
        sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}  # a whole-RAE state dict
    return sd


def _config_dict(config: Any) -> Mapping[str, Any] | None:
    if config is None or isinstance(config, Mapping):
        return config
    if isinstance(config, str) and config in DECODER_SIZES:
        hidden, depth, heads, mlp = DECODER_SIZES[config]
        return dict(hidden_size=hidden, depth=depth, num_heads=heads, intermediate_size=mlp)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"decoder config {config!r} is neither a size name ({', '.join(DECODER_SIZES)}) "
                              "nor a config.json file or folder")
    return json.loads(path.read_text())


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what} lacks the key {key!r}, so it is not a complete RAE decoder state dict")
    return sd[key]


def infer_decoder_arch(sd: Mapping[str, torch.Tensor], config: Any = None, *, num_channels: int = 3,
                       what: str = "decoder state dict") -> dict[str, Any]:
    """ViTDecoder constructor arguments from the tensor shapes, with the head count (the one thing shapes do
    not tell) from ``config``: an official decoder config.json (dict, file or folder), a size name
    (``"ViT-XL"``), or our arch dict. Without a config the head count of the registered size of that
    width is used. Any field the config states must agree with the shapes."""
    embed = _require(sd, "decoder_embed.weight", what)
    pos = _require(sd, "decoder_pos_embed", what)
    pred = _require(sd, "decoder_pred.weight", what)
    mlp = _require(sd, "decoder_layers.0.intermediate.dense.weight", what)
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"decoder_layers\.(\d+)\.", k))})
    patch = math.isqrt(pred.shape[0] // num_channels)
    if patch * patch * num_channels != pred.shape[0]:
        raise CheckpointError(f"{what}: decoder_pred has {pred.shape[0]} outputs, not p·p·{num_channels}")
    arch = dict(latent_dim=embed.shape[1], hidden_size=embed.shape[0], depth=depth, num_heads=None,
                intermediate_size=mlp.shape[0], patch_size=patch, num_patches=pos.shape[1] - 1,
                layer_norm_eps=1e-12, num_channels=num_channels)

    cfg = _config_dict(config)
    if cfg is not None and "decoder_num_attention_heads" in cfg:  # an official ViTMAE-style config.json
        stated = decoder_arch_from_hf_config(cfg, latent_dim=arch["latent_dim"], patch_size=patch,
                                             num_patches=arch["num_patches"])
    else:
        stated = dict(cfg or {})
    for key in ("hidden_size", "depth", "intermediate_size", "latent_dim", "patch_size", "num_patches"):
        if key in stated and stated[key] != arch[key]:
            raise CheckpointError(f"{what}: the config says {key}={stated[key]} but the weights have {arch[key]}")
    arch["layer_norm_eps"] = stated.get("layer_norm_eps", arch["layer_norm_eps"])
    arch["num_heads"] = stated.get("num_heads")
    if arch["num_heads"] is None:
        by_width = {h: heads for h, _, heads, _ in DECODER_SIZES.values()}
        if arch["hidden_size"] not in by_width:
            raise CheckpointError(f"{what}: hidden size {arch['hidden_size']} matches no registered decoder size; "
                                  "pass the decoder config.json to give the number of attention heads")
        arch["num_heads"] = by_width[arch["hidden_size"]]
    return arch


def load_official_decoder(path: str | os.PathLike, config: Any = None, **decoder_kwargs) -> ViTDecoder:
    """Build a ViTDecoder for a released ``model.pt`` (or a stage-1 RAE checkpoint) and load it strictly."""
    sd = load_official_decoder_state_dict(path)
    arch = infer_decoder_arch(sd, config, what=f"decoder weights {path}")
    with torch.device("meta"):  # materialised by the load: no random init to throw away
        decoder = ViTDecoder(**arch, **decoder_kwargs)
    strict_load(decoder, sd, f"decoder weights {path}", assign=True)
    return decoder


def load_decoder_weights(decoder: ViTDecoder, path: str | os.PathLike, *, assign: bool = False) -> None:
    """Strictly load an official ``model.pt`` or our decoder safetensors into an existing decoder (``assign``:
    one built on the meta device, see :func:`rae_cli.checkpoint.strict_load`)."""
    strict_load(decoder, load_official_decoder_state_dict(path), f"decoder weights {path}", assign=assign)


def save_decoder(decoder: ViTDecoder, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Our layout: safetensors with exactly the official keys + ``{"format", "arch"}`` metadata."""
    meta = {"format": DECODER_FORMAT, "arch": decoder.arch(), **(metadata or {})}
    save_safetensors(path, decoder.state_dict(), meta)


def load_decoder(path: str | os.PathLike, **decoder_kwargs) -> ViTDecoder:
    """Rebuild a decoder from our safetensors (architecture from its metadata) and load it strictly."""
    sd, meta = load_safetensors(path)
    arch = meta.get("arch")
    if not isinstance(arch, Mapping) or any(k not in arch for k in ARCH_KEYS):
        raise CheckpointError(f"{path} has no decoder architecture in its metadata (keys {sorted(meta)}); "
                              "convert official model.pt files with rae_cli.official.convert_decoder first")
    with torch.device("meta"):  # materialised by the load: no random init to throw away
        decoder = ViTDecoder(**arch, **decoder_kwargs)
    strict_load(decoder, sd, f"decoder weights {path}", assign=True)
    return decoder


def convert_decoder(model_pt: str | os.PathLike, out_safetensors: str | os.PathLike, config: Any = None
                    ) -> dict[str, Any]:
    """Released decoder ``model.pt`` → our safetensors (verified by a strict load). Returns the architecture."""
    decoder = load_official_decoder(model_pt, config)
    save_decoder(decoder, out_safetensors, {"source": str(model_pt)})
    return decoder.arch()


def export_decoder_official(decoder: ViTDecoder | str | os.PathLike, out_pt: str | os.PathLike) -> None:
    """Our decoder (module or safetensors file) → the official ``model.pt`` layout (``torch.save`` of the raw
    state dict, as RAE's ``pretrained_decoder_path`` expects)."""
    if not isinstance(decoder, ViTDecoder):
        decoder = load_decoder(decoder)
    save_torch_atomic(out_pt, {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()})


# ---------------------------------------------------------------------------------------------------
# Latent statistics


def convert_stats(stat_pt: str | os.PathLike, out_safetensors: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``stat.pt`` → our stats safetensors (the sample count is unknown: stored as null)."""
    mean, var = load_stats(stat_pt)
    save_stats(out_safetensors, mean, var, None, {"source": str(stat_pt)})
    return mean, var


# ---------------------------------------------------------------------------------------------------
# Stage 2


def load_stage2_state_dict(path: str | os.PathLike, *, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """A stage-2 state dict from a released ``stage2_model.pt`` (raw), a training checkpoint (``ema`` preferred,
    ``model`` accepted), or our safetensors; prefixes ``module.``/``_orig_mod.`` stripped. Load it into the
    model with ``checkpoint.strict_load``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return strip_prefixes(load_safetensors(path)[0])
    return unwrap_state_dict(torch_load_weights(path), path, prefer=prefer)


def convert_stage2(pt: str | os.PathLike, out_safetensors: str | os.PathLike, *, prefer: str = "ema",
                   metadata: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Stage-2 ``.pt`` → safetensors with the same keys (pass the model config in ``metadata``)."""
    sd = load_stage2_state_dict(pt, prefer=prefer)
    save_safetensors(out_safetensors, sd, {"format": STAGE2_FORMAT, "source": str(pt), **(metadata or {})})
    return sd
