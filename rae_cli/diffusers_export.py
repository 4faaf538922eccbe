"""Write our RAE as a diffusers ``AutoencoderRAE`` folder (``rae export-decoder --format diffusers``).

The reading side, names and constants are in :mod:`rae_cli.diffusers_rae`. What diffusers cannot represent is
refused, never written as a folder that loads but computes something else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from rae_cli.checkpoint import CheckpointError, save_safetensors
from rae_cli.diffusers_rae import (_DECODER_RENAMES, CLASS_NAME, CONFIG_NAME, DIFFUSERS_STD_EPS, HEAD_DIM,
                                   WEIGHTS_NAME, _encoder_inner_prefix, diffusers_pos_embed)


def _diffusers_encoder_config(etype: str, hidden: int, patch: int, layers: int) -> dict[str, Any]:
    """The transformers config diffusers' ``_build_encoder`` makes (sizes given, everything else default)."""
    import transformers

    common = dict(hidden_size=hidden, patch_size=patch, num_attention_heads=hidden // HEAD_DIM,
                  num_hidden_layers=layers)
    if etype == "dinov2":
        return transformers.Dinov2WithRegistersConfig(image_size=518, **common).to_dict()
    if etype == "siglip2":
        return transformers.SiglipVisionConfig(image_size=256, **common).to_dict()
    return transformers.ViTMAEConfig(image_size=224, mask_ratio=0.0, **common).to_dict()


_ARCH_KEYS = ("hidden_size", "patch_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
              "mlp_ratio", "image_size", "num_register_tokens", "layer_norm_eps", "hidden_act", "qkv_bias",
              "layerscale_value", "use_swiglu_ffn", "num_channels")


def export(rae, out_dir: str | Path) -> Path:
    """Write ``rae`` as a diffusers AutoencoderRAE folder (``AutoencoderRAE.from_pretrained(out_dir)`` loads it).

    Refuses what diffusers cannot represent (an encoder it would build differently, a decoder token grid other
    than the encoder's, a non-default decoder LayerNorm ε or position embedding) instead of writing a folder
    that loads but computes something else."""
    from rae_cli.encoders import hf_config_of

    enc, dec = rae.encoder, rae.decoder
    family = {"DINOv2Encoder": "dinov2", "SigLIP2Encoder": "siglip2", "MAEEncoder": "mae"}.get(type(enc).__name__)
    if family is None:
        raise CheckpointError(f"diffusers AutoencoderRAE supports DINOv2 / SigLIP2 / MAE encoders, not {enc.name}")
    ours = hf_config_of(enc)
    theirs = _diffusers_encoder_config(family, ours["hidden_size"], ours["patch_size"], ours["num_hidden_layers"])
    differ = [f"{k}: ours {ours.get(k)!r}, diffusers {theirs.get(k)!r}" for k in _ARCH_KEYS
              if (k in ours or k in theirs) and ours.get(k) != theirs.get(k)]
    if family == "dinov2" and ours.get("model_type") != "dinov2_with_registers":
        differ.append("registers: diffusers' DINOv2 always has 4 register tokens")
    if differ:
        raise CheckpointError(f"diffusers would build a different {family} encoder: " + "; ".join(differ))
    grid = rae.input_size // enc.patch_size
    if dec.num_patches != grid * grid:
        raise CheckpointError(f"the decoder's token grid ({dec.num_patches} tokens) differs from the encoder's "
                              f"({grid}×{grid}); diffusers derives it from the encoder")
    if dec.layer_norm_eps != 1e-12 or dec.num_channels != 3:
        raise CheckpointError("diffusers' RAE decoder has LayerNorm eps 1e-12 and 3 channels")
    if not torch.allclose(dec.decoder_pos_embed.detach().cpu(), diffusers_pos_embed(dec.hidden_size, grid), atol=1e-6):
        raise CheckpointError(f"the decoder position embedding differs from the table diffusers computes for a "
                              f"{grid}×{grid} grid (diffusers scales positions by 16/grid, so only 16×16 grids of "
                              "the MAE sin-cos table match)")

    sd: dict[str, torch.Tensor] = {}
    prefix = _encoder_inner_prefix(enc)
    wrap = "vision_model." if family == "siglip2" and _siglip_is_wrapped() else ""
    for k, v in enc.state_dict().items():
        sd["encoder." + wrap + k[len(prefix):]] = v
    for k, v in dec.state_dict().items():
        if k == "decoder_pos_embed":
            continue
        for new, old in _DECODER_RENAMES:  # ours → diffusers
            k = k.replace(old, new)
        sd["decoder." + k] = v
    sd["encoder_mean"] = torch.tensor(enc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd["encoder_std"] = torch.tensor(enc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    if rae.has_stats:
        mean = rae.latent_mean.detach().cpu().double()
        std = torch.sqrt(rae.latent_var.detach().cpu().double() + rae.eps) - DIFFUSERS_STD_EPS
    else:  # identity in diffusers: std + 1e-5 = 1
        mean, std = torch.zeros(1, dtype=torch.float64), torch.full((1,), 1.0 - DIFFUSERS_STD_EPS, dtype=torch.float64)
    sd["_latents_mean"], sd["_latents_std"] = mean.float(), std.float()

    config = {"_class_name": CLASS_NAME, "_diffusers_version": _diffusers_version(),
              "encoder_type": family, "encoder_hidden_size": ours["hidden_size"],
              "encoder_patch_size": ours["patch_size"], "encoder_num_hidden_layers": ours["num_hidden_layers"],
              "decoder_hidden_size": dec.hidden_size, "decoder_num_hidden_layers": dec.depth,
              "decoder_num_attention_heads": dec.num_heads, "decoder_intermediate_size": dec.intermediate_size,
              "patch_size": dec.patch_size, "encoder_input_size": rae.input_size, "image_size": rae.image_size,
              "num_channels": 3, "encoder_norm_mean": list(enc.image_mean), "encoder_norm_std": list(enc.image_std),
              # the buffers' shapes come from the config, so the statistics are written there too
              "latents_mean": sd["_latents_mean"].tolist(), "latents_std": sd["_latents_std"].tolist(),
              "noise_tau": float(rae.noise_tau), "reshape_to_2d": True, "use_encoder_loss": False,
              "scaling_factor": 1.0}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / WEIGHTS_NAME, {k: v.detach().cpu().contiguous() for k, v in sd.items()},
                     {"format": "pt", "exported_by": "rae-cli"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def export_preset(rae_preset: str | Path, out_dir: str | Path) -> Path:
    """Build the RAE of an rae preset/YAML (encoder, decoder weights, statistics) and ``export`` it."""
    import logging

    from rae_cli.build import build_rae
    from rae_cli.config import resolve
    from rae_cli.schema import RAEConfig

    rae = build_rae(resolve(RAEConfig, str(rae_preset))).eval()
    if rae.encoder.is_random_init:
        logging.getLogger(__name__).warning("exporting a RANDOM-INIT encoder (test only) into %s", out_dir)
    return export(rae, out_dir)


def _siglip_is_wrapped() -> bool:
    """transformers 4.x ``SiglipVisionModel`` wraps the tower in ``.vision_model`` (5.x does not)."""
    import transformers

    return int(re.match(r"\d+", transformers.__version__).group()) < 5


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return "0.39.0"  # the first release with AutoencoderRAE
