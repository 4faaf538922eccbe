"""The run folder and the ONE resume policy of both trainers: resume = run the same command again.

Only a run folder that holds a checkpoint is a run to resume. A folder whose earlier launch failed before its first
checkpoint (missing weights, a typo, a kill during start-up) holds at most a ``config.yaml``: it is started afresh
with the new config. A folder with a checkpoint resumes from it, and the resolved config of this launch must equal
the checkpoint's except for :data:`RESUMABLE_KEYS` — the keys that steer where the data is read from, memory,
speed, logging, saving and stopping, but not what is trained. Any other change is refused with one line naming the
keys and what to do (a new ``--out``, or the old values).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from rae_cli.config import ConfigError

log = logging.getLogger(__name__)

# Dotted keys of the resolved configs that a resume may change (train-dit keys, then train-decoder keys).
RESUMABLE_KEYS = frozenset({
    # train-dit: data location (a moved cache or image folder; its latent statistics are checked by content hash),
    # micro-batching, activation checkpointing, workers, device, stopping, logging, saving and retention
    "cache", "images", "stats", "rae.stats", "grad_accum_steps", "dit.grad_checkpointing", "num_workers", "device",
    "max_steps", "log_every", "tensorboard", "wandb", "wandb_project", "ckpt_every_epochs", "ckpt_every_steps",
    "ckpt_every_minutes", "keep_last", "keep_every_epochs",
    # train-decoder: the same concepts under its sections
    "data.path", "data.num_workers", "train.micro_batch_size", "train.grad_checkpointing", "train.device",
    "train.stop_after", "train.log_every", "train.tensorboard", "train.wandb", "train.wandb_project",
    "train.eval_every", "train.ckpt_every", "train.ckpt_every_minutes", "train.keep_last", "train.keep_every",
    # process-level settings of other branches (collective timeout, node-local cache copies)
    "dist_timeout", "train.dist_timeout", "cache_local_dir",
    # how the processes share the model (DDP or FSDP): the checkpoints are the same full state dicts either way
    "parallel", "train.parallel",
    # bookkeeping written next to every config
    "rae_version", "kind",
})


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists and scalars are leaves."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two config dicts; a key absent from ``old`` (a setting added by a
    later version of the package) or from ``new`` (bookkeeping) is not a change."""
    a = flatten(json.loads(json.dumps(dict(old))))
    b = flatten(json.loads(json.dumps(dict(new))))
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def check_resume(saved: Mapping[str, Any], cfg_dict: Mapping[str, Any], run: Path) -> list[str]:
    """Refuse (ConfigError) a resume whose config differs from the checkpoint's outside :data:`RESUMABLE_KEYS`;
    return the allowed keys that did change (the caller logs them)."""
    changed = changed_keys(saved, cfg_dict)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        old, new = flatten(dict(saved)), flatten(json.loads(json.dumps(dict(cfg_dict))))
        shown = "; ".join(f"{k}: {old[k]!r} → {new[k]!r}" for k in refused[:6])
        back = " ".join(f"{k}={json.dumps(old[k])}" for k in refused[:6])
        raise ConfigError(f"{run} holds a run with a different config ({shown}); these keys may not change on "
                          f"resume. Use a new --out for a new run, or resume with the old values ({back}).")
    return [k for k in changed if k not in ("rae_version", "kind")]


def resume_point(out: Path, cfg_dict: Mapping[str, Any], dist=None):
    """The checkpoint to resume ``out`` from (None: start afresh), after checking the resume policy against it.

    Under DDP rank 0 picks the checkpoint and every rank uses its pick (listings of a shared filesystem may differ
    between nodes); every rank checks the policy, so all of them stop together on a refused change."""
    from rae_cli import distributed
    from rae_cli.config import read_yaml
    from rae_cli.run_dir import CONFIG_FILE, latest_checkpoint

    last = latest_checkpoint(Path(out) / "checkpoints") if dist is None or dist.is_main else None
    if dist is not None:
        last = distributed.broadcast_object(last, dist)
    if last is None:
        if (Path(out) / CONFIG_FILE).is_file():
            log.info("%s holds no checkpoint (an earlier launch stopped before its first save): starting afresh", out)
        return None
    saved = last.path / CONFIG_FILE
    if saved.is_file():
        for key in check_resume(read_yaml(saved), cfg_dict, Path(out)):
            log.warning("resuming with a changed setting %s (allowed on resume)", key)
    return last


def write_run_config(out: Path, cfg: Any, dist, extra: Mapping[str, Any] | None = None) -> None:
    """Rank 0 creates ``out``, clears leftovers of interrupted saves and writes ``out/config.yaml``; then the rest."""
    from rae_cli import distributed
    from rae_cli.config import save_resolved
    from rae_cli.run_dir import CONFIG_FILE, clean_temporary

    with distributed.main_first(dist):
        if dist.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            clean_temporary(Path(out) / "checkpoints")
            save_resolved(cfg, Path(out) / CONFIG_FILE, extra=extra)
