"""diffusers ``AutoencoderRAE`` interop, the reading side: its folders (local or hub) into our RAE pieces.

A diffusers RAE folder is ``config.json`` (``_class_name: AutoencoderRAE``) + ``diffusion_pytorch_model.safetensors``
holding the frozen encoder (``encoder.*``, the transformers model), the decoder (``decoder.*``, diffusers attention
names), the pixel constants (``encoder_mean`` / ``encoder_std``) and the latent statistics (``_latents_mean`` /
``_latents_std``). Every tensor is mapped, none dropped: loading is strict on both sides.

Two conventions differ from ours and are converted exactly (diffusers 0.39 – 0.42, ``autoencoder_rae.py``):
- latent normalisation: diffusers computes ``(z − mean) / (std + 1e-5) · scaling_factor``, we compute
  ``(z − mean) / sqrt(var + eps)``; so ``sqrt(var + eps) = (std + 1e-5) / scaling_factor``. Without statistics
  diffusers still divides by ``1 + 1e-5``, so an imported RAE always carries statistics;
- the decoder's sin-cos position embedding is a non-persistent buffer in diffusers and a (frozen) tensor in our
  state dict: it is recomputed on import and checked on export. diffusers computes it with positions scaled by
  16/grid (``get_2d_sincos_pos_embed``'s ``base_size=16``), which equals the official MAE table only for a 16×16
  token grid (the 256-px models); for other grids we reproduce diffusers' table on import and refuse to export.

Writing ours as one is :mod:`rae_cli.diffusers_export`. No diffusers install is needed to read or write these
folders; the parity tests use diffusers itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from rae_cli.checkpoint import CheckpointError, load_safetensors
from rae_cli.weights import WeightsNotFoundError, is_offline

CLASS_NAME = "AutoencoderRAE"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
HUB_PREFIX = "hf:"
DIFFUSERS_STD_EPS = 1e-5  # the constant in diffusers' (z − mean) / (std + 1e-5)
HEAD_DIM = 64  # diffusers builds every encoder with num_attention_heads = hidden_size // 64

# encoder_type → (our registry encoder whose architecture diffusers builds, encoder-module key prefix of ours)
ENCODER_TYPES = {"dinov2": "dinov2-b", "siglip2": "siglip2-b", "mae": "mae-b"}

# diffusers decoder attention names → ours (the official ViTMAE names)
_DECODER_RENAMES = ((".attention.to_q.", ".attention.attention.query."),
                    (".attention.to_k.", ".attention.attention.key."),
                    (".attention.to_v.", ".attention.attention.value."),
                    (".attention.to_out.0.", ".attention.output.dense."))


# ---------------------------------------------------------------------------------------------------
# Finding a folder


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a local folder whose config.json names ``AutoencoderRAE``."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == CLASS_NAME
    except (ValueError, OSError):
        return False


def is_diffusers_file(path: str | Path) -> bool:
    """True for a ``diffusion_pytorch_model.safetensors`` next to an AutoencoderRAE config.json."""
    path = Path(path)
    return path.suffix == ".safetensors" and is_diffusers_folder(path.parent)


def locate(source: str) -> Path:
    """The local folder of a diffusers RAE: ``source`` is a folder, or ``hf:<repo id>`` (HF cache first; the hub
    only when online). Raises ``WeightsNotFoundError`` saying how to get it."""
    if not source.startswith(HUB_PREFIX):
        folder = Path(source).expanduser()
        if not is_diffusers_folder(folder) or not (folder / WEIGHTS_NAME).is_file():
            raise WeightsNotFoundError(
                f"rae.source={source!r} is not a diffusers AutoencoderRAE folder (config.json with _class_name "
                f"{CLASS_NAME!r} and {WEIGHTS_NAME}); for a hub repository write rae.source=hf:<repo id>")
        return folder
    repo = source[len(HUB_PREFIX):]
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_NAME, WEIGHTS_NAME]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError and friends)
        cached_error = e
    if is_offline():
        raise WeightsNotFoundError(
            f"diffusers RAE {repo!r} is not in the Hugging Face cache and offline mode (HF_HUB_OFFLINE) is set. "
            f"Run `huggingface-cli download {repo}` while online, or pass a local folder as rae.source."
        ) from cached_error
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types
        raise WeightsNotFoundError(f"downloading the diffusers RAE {repo!r} failed ({type(e).__name__}: "
                                   f"{str(e)[:300]}); or pass a local folder as rae.source") from e


def read_config(folder: str | Path) -> dict[str, Any]:
    """The AutoencoderRAE config.json of ``folder``, checked for the options we cannot represent."""
    path = Path(folder) / CONFIG_NAME
    cfg = json.loads(path.read_text())
    if cfg.get("_class_name") != CLASS_NAME:
        raise CheckpointError(f"{path} describes a {cfg.get('_class_name')!r}, not a diffusers {CLASS_NAME}")
    if cfg.get("encoder_type", "dinov2") not in ENCODER_TYPES:
        raise CheckpointError(f"{path}: unknown encoder_type {cfg.get('encoder_type')!r} "
                              f"(diffusers knows {', '.join(ENCODER_TYPES)})")
    if not cfg.get("reshape_to_2d", True):
        raise CheckpointError(f"{path}: reshape_to_2d=false (token-sequence latents) is not supported")
    if cfg.get("num_channels", 3) != 3:
        raise CheckpointError(f"{path}: num_channels={cfg['num_channels']}; only RGB is supported")
    return cfg


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def rae_fields(folder: str | Path) -> dict[str, Any]:
    """Our ``rae`` config fields that describe the diffusers RAE in ``folder`` (encoder, sizes, weights, stats)."""
    cfg = read_config(folder)
    folder = Path(folder).resolve()
    kind, overrides = encoder_identity(cfg)
    return dict(encoder=kind if not overrides else cfg.get("encoder_type", "dinov2"),
                encoder_source=str(folder), encoder_random_init=False, encoder_options={},
                encoder_input_size=int(_get(cfg, "encoder_input_size", 224)),
                decoder="custom", decoder_hidden_size=int(_get(cfg, "decoder_hidden_size", 512)),
                decoder_depth=int(_get(cfg, "decoder_num_hidden_layers", 8)),
                decoder_heads=int(_get(cfg, "decoder_num_attention_heads", 16)),
                decoder_intermediate_size=int(_get(cfg, "decoder_intermediate_size", 2048)),
                decoder_patch_size=int(_get(cfg, "patch_size", 16)),
                decoder_weights=str(folder / WEIGHTS_NAME), stats=str(folder / WEIGHTS_NAME))


# ---------------------------------------------------------------------------------------------------
# Encoder


def encoder_identity(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry name, config overrides) of the encoder diffusers builds for ``cfg``: no overrides when it is
    exactly a registry encoder (e.g. DINOv2-B with registers → ``dinov2-b``)."""
    from rae_cli.encoders import ENCODERS

    etype = cfg.get("encoder_type", "dinov2")
    hidden = int(_get(cfg, "encoder_hidden_size", 768))
    sizes = dict(hidden_size=hidden, patch_size=int(_get(cfg, "encoder_patch_size", 14)),
                 num_hidden_layers=int(_get(cfg, "encoder_num_hidden_layers", 12)),
                 num_attention_heads=hidden // HEAD_DIM)
    if sizes["num_attention_heads"] < 1:
        raise CheckpointError(f"encoder_hidden_size={hidden} < {HEAD_DIM}: diffusers cannot build this encoder")
    for name, spec in ENCODERS.items():
        if spec.family == etype and all(spec.config.get(k) == v for k, v in sizes.items()) and \
                (etype != "dinov2" or spec.config.get("num_register_tokens") == 4):
            return name, {}
    return ENCODER_TYPES[etype], sizes


def _encoder_inner_prefix(encoder) -> str:
    """The key prefix of the transformers backbone inside our encoder module (``encoder.`` or ``model.``)."""
    from rae_cli.encoders import DINOv2Encoder

    return "encoder." if isinstance(encoder, DINOv2Encoder) else "model."


def build_encoder(folder: str | Path, kind: str | None = None):
    """Our frozen encoder for the diffusers RAE in ``folder``, its weights (and pixel constants) loaded strictly."""
    from rae_cli.encoders import encoder_from_config

    folder = Path(folder)
    cfg = read_config(folder)
    name, overrides, etype = _encoder_identity_checked(cfg, kind, folder)
    sd, _ = load_safetensors(folder / WEIGHTS_NAME)
    mean = sd["encoder_mean"].flatten().tolist() if "encoder_mean" in sd else None
    std = sd["encoder_std"].flatten().tolist() if "encoder_std" in sd else None
    encoder = encoder_from_config(name, overrides, image_mean=mean, image_std=std)
    inner = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if etype == "siglip2":  # transformers 4.x saves the tower under vision_model.; 5.x flattens it
        inner = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in inner.items()}
    prefix = _encoder_inner_prefix(encoder)
    encoder.load_official_state_dict({prefix + k: v for k, v in inner.items()})
    encoder.name = f"{name} (diffusers {folder})" if not overrides else f"{etype}:{folder}"
    return encoder


def encoder_architecture(folder: str | Path, kind: str | None = None):
    """The encoder of ``build_encoder(folder, kind)`` from the folder's config alone (no weights read; call it
    under ``torch.device("meta")`` or a fake-tensor mode)."""
    from rae_cli.encoders import encoder_from_config

    name, overrides, _ = _encoder_identity_checked(read_config(Path(folder)), kind, Path(folder))
    return encoder_from_config(name, overrides)


def encoder_info(folder: str | Path, kind: str | None = None):
    """The :class:`~rae_cli.encoders.EncoderInfo` of ``build_encoder(folder, kind)`` without reading the encoder's
    weights: the architecture is built on the meta device, the pixel constants read alone from the file."""
    from safetensors import safe_open

    from rae_cli.encoders import encoder_from_config

    folder = Path(folder)
    cfg = read_config(folder)
    name, overrides, etype = _encoder_identity_checked(cfg, kind, folder)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        mean, std = (f.get_tensor(k).flatten().tolist() if k in keys else None for k in ("encoder_mean", "encoder_std"))
    with torch.device("meta"):
        encoder = encoder_from_config(name, overrides, image_mean=mean, image_std=std)
    info = encoder.info()
    return type(info)(f"{name} (diffusers {folder})" if not overrides else f"{etype}:{folder}", info.hidden_size,
                      info.patch_size, info.image_mean, info.image_std)


def _encoder_identity_checked(cfg: Mapping[str, Any], kind: str | None, folder: Path) -> tuple[str, dict, str]:
    """(registry name, config overrides, encoder_type) of the folder's encoder; refuses a contradicting ``kind``."""
    from rae_cli.encoders import ENCODERS

    name, overrides = encoder_identity(cfg)
    etype = cfg.get("encoder_type", "dinov2")
    if kind is not None and kind not in (name, etype) and ENCODERS.get(kind, None) is not ENCODERS.get(name):
        raise CheckpointError(f"rae.encoder={kind!r} but the diffusers RAE at {folder} holds a {etype} encoder "
                              f"({name if not overrides else overrides}); leave rae.encoder to rae.source")
    return name, overrides, etype


# ---------------------------------------------------------------------------------------------------
# Decoder and statistics


def diffusers_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """diffusers' decoder position table, (1, 1 + grid², dim): the MAE sin-cos table (first half of the channels
    embeds the column, second half the row; a zero CLS row) at positions ``arange(grid) · 16/grid``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = (torch.arange(grid, dtype=torch.float32) / (grid / 16)).double()  # base_size 16, in fp32 as diffusers
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (g, g), row-major tokens
    halves = [torch.cat([(p.reshape(-1, 1) * omega).sin(), (p.reshape(-1, 1) * omega).cos()], 1) for p in (cols, rows)]
    emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(halves, 1)], 0)  # (1 + g², dim)
    return emb.float().unsqueeze(0)


def decoder_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Our decoder state dict (official names) from a diffusers RAE weights file; the position embedding, which
    diffusers does not store, is the table diffusers computes."""
    sd, _ = load_safetensors(path)
    out = {}
    for k, v in sd.items():
        if not k.startswith("decoder."):
            continue
        k = k[len("decoder."):]
        for old, new in _DECODER_RENAMES:
            k = k.replace(old, new)
        out[k] = v
    if "decoder_embed.weight" not in out:
        raise CheckpointError(f"{path} holds no decoder (no decoder.decoder_embed.weight)")
    if "decoder_pos_embed" not in out:
        cfg = read_config(Path(path).parent)
        grid = int(_get(cfg, "encoder_input_size", 224)) // int(_get(cfg, "encoder_patch_size", 14))
        out["decoder_pos_embed"] = diffusers_pos_embed(out["decoder_embed.weight"].shape[0], grid)
    return out


def latent_shape_of(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    grid = int(_get(cfg, "encoder_input_size", 224)) // int(_get(cfg, "encoder_patch_size", 14))
    return int(_get(cfg, "encoder_hidden_size", 768)), grid, grid


def load_stats(path: str | Path, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) of shape (C, h, w) that make our ``(z − mean)/sqrt(var + eps)`` equal diffusers'
    ``(z − mean)/(std + 1e-5)·scaling_factor`` (broadcast like diffusers does)."""
    path = Path(path)
    cfg = read_config(path.parent)
    sd, _ = load_safetensors(path)
    shape = latent_shape_of(cfg)
    mean = sd.get("_latents_mean", torch.zeros(1)).double()
    std = sd.get("_latents_std", torch.ones(1)).double()
    sf = float(_get(cfg, "scaling_factor", 1.0))
    try:
        mean, std = torch.broadcast_to(mean, shape), torch.broadcast_to(std, shape)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: latent statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} do not "
                              f"broadcast to the latent shape {shape}") from e
    denom = (std + DIFFUSERS_STD_EPS) / sf  # our sqrt(var + eps)
    return mean.float().contiguous(), (denom * denom - eps).float().contiguous()


def load_decoder_weights(decoder, path: str | Path, *, assign: bool = False) -> None:
    from rae_cli.checkpoint import strict_load

    strict_load(decoder, decoder_state_dict(path), f"diffusers RAE decoder {path}", assign=assign)


# ---------------------------------------------------------------------------------------------------
# Whole RAE


def load_rae(source: str, *, eps: float = 1e-5):
    """Our ``RAE`` (encoder, decoder, statistics) from a diffusers AutoencoderRAE folder or ``hf:<repo id>``."""
    from rae_cli.decoder import ViTDecoder
    from rae_cli.rae import RAE

    folder = locate(source)
    cfg = read_config(folder)
    encoder = build_encoder(folder)
    C, h, w = latent_shape_of(cfg)
    with torch.device("meta"):  # materialised by the load: no random init to throw away
        decoder = ViTDecoder(latent_dim=C, hidden_size=int(_get(cfg, "decoder_hidden_size", 512)),
                             depth=int(_get(cfg, "decoder_num_hidden_layers", 8)),
                             num_heads=int(_get(cfg, "decoder_num_attention_heads", 16)),
                             intermediate_size=int(_get(cfg, "decoder_intermediate_size", 2048)),
                             patch_size=int(_get(cfg, "patch_size", 16)), num_patches=h * w)
    load_decoder_weights(decoder, folder / WEIGHTS_NAME, assign=True)
    mean, var = load_stats(folder / WEIGHTS_NAME, eps)
    return RAE(encoder, decoder, input_size=int(_get(cfg, "encoder_input_size", 224)),
               noise_tau=float(_get(cfg, "noise_tau", 0.0)), latent_mean=mean, latent_var=var, eps=eps)
