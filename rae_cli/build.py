"""Builders: config sections → ready modules with weights and statistics loaded (the only place that does I/O for models).

``build_rae`` resolves encoder/decoder/stats sources (local paths, released artifact names, HF ids) and loads them
strictly; ``build_dit_model`` turns a :class:`DiTConfig` and a latent shape into a registry model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from rae_cli.config import ConfigError, presets_root
from rae_cli.schema import DiTConfig, RAEConfig

log = logging.getLogger(__name__)


def resolve_source(source: str | None) -> str | None:
    """``presets:<rel>`` → a path inside the shipped presets folder; anything else unchanged."""
    if source and source.startswith("presets:"):
        return str(presets_root() / source[len("presets:"):])
    return source


def resolve_weights_path(value: str | None) -> Path | None:
    """A local file path, or a released-artifact name looked up in the one weights location (``rae_cli.weights``)."""
    if value is None:
        return None
    value = resolve_source(value)
    p = Path(value).expanduser()
    if p.exists() or "/" in value or p.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        if not p.exists():
            from rae_cli.errors import DataError

            raise DataError(f"weights file not found: {p}")
        return p
    from rae_cli import weights

    return weights.resolve(value)


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_encoder(cfg: RAEConfig):
    from rae_cli.encoders import load_encoder

    return load_encoder(cfg.encoder, resolve_source(cfg.encoder_source), random_init=cfg.encoder_random_init,
                        seed=cfg.seed, **dict(cfg.encoder_options))


def encoder_info(cfg: RAEConfig):
    """Width, patch size and pixel constants of the encoder of ``cfg`` without loading (or building) it."""
    from rae_cli.encoders import encoder_info as info

    return info(cfg.encoder, resolve_source(cfg.encoder_source), random_init=cfg.encoder_random_init,
                seed=cfg.seed, **dict(cfg.encoder_options))


def decoder_arch(cfg: RAEConfig, latent_dim: int, num_patches: int) -> dict:
    """Decoder constructor arguments from the config: a named size, custom, or an official config.json (parsed by
    :func:`rae_cli.decoder.decoder_arch_from_hf_config`, the decoder module's own reader of that format)."""
    from rae_cli.decoder import DECODER_SIZES, decoder_arch_from_hf_config

    if cfg.decoder == "custom":
        hidden, depth, heads, inter = (cfg.decoder_hidden_size, cfg.decoder_depth, cfg.decoder_heads,
                                       cfg.decoder_intermediate_size)
    elif cfg.decoder in DECODER_SIZES:
        hidden, depth, heads, inter = DECODER_SIZES[cfg.decoder]
    else:
        import json

        path = Path(resolve_source(cfg.decoder))
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"rae.decoder={cfg.decoder!r} is neither a size ({', '.join(DECODER_SIZES)}, custom) "
                              "nor an official decoder config.json")
        try:
            return decoder_arch_from_hf_config(json.loads(path.read_text()), latent_dim=latent_dim,
                                               patch_size=cfg.decoder_patch_size, num_patches=num_patches)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rae.decoder={cfg.decoder!r}: {e}") from e
    return dict(latent_dim=latent_dim, hidden_size=hidden, depth=depth, num_heads=heads, intermediate_size=inter,
                patch_size=cfg.decoder_patch_size, num_patches=num_patches)


RAE_PARTS = frozenset({"encoder", "decoder"})


def build_rae(cfg: RAEConfig, device: str | torch.device = "cpu", *, parts=RAE_PARTS):
    """The RAE of ``cfg`` with the ``parts`` a command uses: the frozen encoder, the decoder (its weights if given)
    or both (the default); always the latent statistics, if given.

    Encoding needs ``{"encoder"}`` and decoding ``{"decoder"}``; the half not asked for is never built (a
    decode-only RAE takes the encoder's width and pixel constants from its config). A decoder with weights is
    built on the meta device and materialised by the load; without weights it gets the seeded random init.
    """
    from rae_cli.rae import RAE

    parts = frozenset(parts)
    if not parts or parts - RAE_PARTS:
        raise ValueError(f"parts must be a non-empty subset of {sorted(RAE_PARTS)}, got {sorted(parts)}")
    encoder = build_encoder(cfg) if "encoder" in parts else None
    info = encoder.info() if encoder is not None else encoder_info(cfg)
    grid = cfg.encoder_input_size // info.patch_size
    if grid * info.patch_size != cfg.encoder_input_size:
        raise ConfigError(f"rae.encoder_input_size={cfg.encoder_input_size} is not a multiple of the encoder patch "
                          f"size {info.patch_size}")
    decoder = build_decoder(cfg, info.hidden_size, grid * grid) if "decoder" in parts else None
    mean = var = None
    if cfg.stats:
        from rae_cli.latent_stats import load_stats

        mean, var = load_stats(resolve_weights_path(cfg.stats), eps=cfg.eps)
    rae = RAE(encoder, decoder, input_size=cfg.encoder_input_size, noise_tau=cfg.noise_tau,
              latent_mean=mean, latent_var=var, eps=cfg.eps, encoder_info=info,
              image_size=image_size_of(cfg, info.patch_size))
    if mean is not None and tuple(mean.shape) != tuple(rae.latent_shape):
        raise ConfigError(f"latent statistics {cfg.stats} have shape {tuple(mean.shape)} but this autoencoder "
                          f"makes latents of shape {tuple(rae.latent_shape)}; use the stats made for this preset")
    return rae.to(device)


def build_decoder(cfg: RAEConfig, latent_dim: int, num_patches: int):
    """The decoder of ``cfg``: ``rae.decoder_weights`` loaded into a meta-device build (no random init made and
    overwritten: 415M parameters for ViT-XL), or, without weights, the random init seeded by ``rae.seed``."""
    from rae_cli.decoder import ViTDecoder

    arch = decoder_arch(cfg, latent_dim, num_patches)
    if cfg.decoder_weights:
        path = resolve_weights_path(cfg.decoder_weights)  # a missing file fails before anything is built
        with torch.device("meta"):
            decoder = ViTDecoder(**arch)
        load_decoder_weights(decoder, path, assign=True)
        return decoder
    with torch.random.fork_rng(devices=[]):  # a seeded decoder init that leaves the caller's RNG state alone
        torch.manual_seed(cfg.seed)
        return ViTDecoder(**arch)


def load_decoder_weights(decoder: torch.nn.Module, path: Path, *, assign: bool = False) -> None:
    """Our decoder .safetensors, an official ``model.pt`` (by :mod:`rae_cli.official`) or a diffusers
    ``AutoencoderRAE`` folder's weights (``rae.source``), loaded strictly (``assign``: into a meta-device build)."""
    from rae_cli.diffusers_rae import is_diffusers_file
    from rae_cli.official import load_decoder_weights as load

    if is_diffusers_file(path):
        from rae_cli.diffusers_rae import load_decoder_weights as load_diffusers

        return load_diffusers(decoder, path, assign=assign)
    load(decoder, path, assign=assign)


def image_size_of(cfg: RAEConfig, patch_size_of_encoder: int) -> int:
    """Output image side: decoder patch × latent grid side."""
    return cfg.decoder_patch_size * (cfg.encoder_input_size // patch_size_of_encoder)


def build_dit_model(cfg: DiTConfig, latent_shape: Sequence[int], num_classes: int, *,
                    state_dict: Mapping[str, torch.Tensor] | None = None, what: str = "DiT weights"
                    ) -> torch.nn.Module:
    """A registry DiT/DiT-DH for latents of shape (C, h, w); refuses width < C unless ``allow_narrow`` (Theorem 1).

    With ``state_dict`` the model is built on the meta device and materialised by a strict load of those weights
    (no random init of a 675M-parameter DiT-XL made and thrown away); without, it gets the random init (global RNG).
    """
    from rae_cli.checkpoint import strict_load
    from rae_cli.dit import build_dit

    c, h, w = (int(d) for d in latent_shape)
    if h != w:
        raise ConfigError(f"latents must be square, got {h}×{w}")
    overrides = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads") if getattr(cfg, k) is not None}
    try:
        with torch.device("meta") if state_dict is not None else contextlib.nullcontext():
            model = build_dit(cfg.name, input_size=h, in_channels=c, num_classes=num_classes,
                              patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio,
                              class_dropout_prob=cfg.class_dropout_prob, learn_pos_embed=cfg.learn_pos_embed,
                              final_norm=cfg.final_norm, allow_narrow=cfg.allow_narrow, second_time=cfg.second_time,
                              **overrides)
    except ValueError as e:  # unknown name, width rule (Theorem 1), inconsistent sizes
        raise ConfigError(f"dit: {e}") from e
    model.grad_checkpointing = cfg.grad_checkpointing
    if state_dict is not None:
        strict_load(model, state_dict, what=what, assign=True)
    return model


def latent_dim(latent_shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in latent_shape)
