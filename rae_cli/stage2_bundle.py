"""What a stage-2 checkpoint carries so that it stands alone (``rae sample checkpoint=RUN`` after the cache is gone).

Every train-dit checkpoint holds ``latent_stats.safetensors`` — the latent statistics the model was trained with,
under the keys of our stats files (``mean``, ``var``) — and its ``meta.json`` records their content hash and the
RAE identity needed to decode (encoder name/source/input size, decoder and its weights reference, latent shape, eps).
Sampling uses the checkpoint's own statistics; statistics passed explicitly must have the same hash, unless
``allow_stats_mismatch=true``. Older checkpoints (statistics only as an absolute path) still load.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from rae_cli.config import ConfigError

log = logging.getLogger(__name__)

STATS_FILE = "latent_stats.safetensors"
STATS_WEIGHTS = "latent_stats"  # the entry of save_checkpoint(weights=...) that becomes STATS_FILE


def stats_hash(mean: torch.Tensor | None, var: torch.Tensor | None) -> str | None:
    """sha256 of the statistics' float32 values and shapes (None without statistics)."""
    if mean is None:
        return None
    h = hashlib.sha256()
    for t in (mean, var):
        t = t.detach().float().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_stats_hash(path: str | Path) -> str:
    from rae_cli.latent_stats import load_stats

    return stats_hash(*load_stats(path))


def rae_identity(rae_cfg, latent_shape) -> dict[str, Any]:
    """The autoencoder a sampler needs to decode this model's latents (the frozen encoder is referenced)."""
    identity = {"encoder": rae_cfg.encoder, "encoder_source": rae_cfg.encoder_source,
                "encoder_input_size": rae_cfg.encoder_input_size, "encoder_random_init": rae_cfg.encoder_random_init,
                "decoder": rae_cfg.decoder, "decoder_patch_size": rae_cfg.decoder_patch_size,
                "decoder_weights": rae_cfg.decoder_weights, "latent_shape": [int(d) for d in latent_shape],
                "eps": rae_cfg.eps}
    identity["sha256"] = hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()
    return identity


def checkpoint_entries(mean, var, rae_cfg, latent_shape, source: str | None) -> tuple[dict, dict]:
    """(extra ``weights`` entries, extra ``meta`` entries) for :func:`rae_cli.run_dir.save_checkpoint`."""
    weights = {STATS_WEIGHTS: {"mean": mean.float(), "var": var.float()}} if mean is not None else {}
    meta = {"latent_stats": {"file": STATS_FILE if mean is not None else None, "sha256": stats_hash(mean, var),
                             "source": source},
            "rae_identity": rae_identity(rae_cfg, latent_shape)}
    return weights, meta


def recorded_hash(folder: Path) -> tuple[bool, str | None]:
    """(whether ``folder``'s meta.json records statistics at all, their hash or None for a raw-latent model)."""
    import json

    meta_file = Path(folder) / "meta.json"
    if not meta_file.is_file():
        return False, None
    info = json.loads(meta_file.read_text()).get("latent_stats")
    if not isinstance(info, dict):
        return False, None
    return True, info.get("sha256")


def own_stats(folder: Path, saved_path: str | None) -> str | None:
    """The statistics a sample run of checkpoint ``folder`` should use by default: its own file if it has one;
    else (an older checkpoint) the recorded path, with a warning if that path is gone."""
    own = Path(folder) / STATS_FILE
    if own.is_file():
        return str(own.resolve())
    if saved_path and not Path(saved_path).exists():
        log.warning("%s records its latent statistics only as %s, which no longer exists (an older checkpoint "
                    "whose latent cache was moved or deleted): pass rae.stats=PATH/stats.safetensors of the cache it "
                    "was trained on", folder, saved_path)
    return saved_path


def check_sampling_stats(folder: Path | None, stats_path: str | None, allow_mismatch: bool) -> None:
    """Refuse statistics whose hash differs from the ones checkpoint ``folder`` was trained with."""
    if folder is None:
        return
    recorded, want = recorded_hash(folder)
    if not recorded:
        return  # an older checkpoint, or an official/converted one: nothing to compare with
    from rae_cli.build import resolve_weights_path

    got = file_stats_hash(resolve_weights_path(stats_path)) if stats_path else None
    if got == want or allow_mismatch:
        if got != want:
            log.warning("latent statistics %s differ from the ones %s was trained with (allow_stats_mismatch=true): "
                        "images are de-normalised with other statistics", stats_path, folder)
        return
    trained = f"{folder / STATS_FILE}" if want else "none (raw latents)"
    raise ConfigError(f"the latent statistics {stats_path or 'none'} differ from the ones {folder} was trained with "
                      f"({trained}; sha256 {str(want)[:12]}… vs {str(got)[:12]}…): drop rae.stats to use the "
                      "checkpoint's own, or set allow_stats_mismatch=true to use these anyway")
