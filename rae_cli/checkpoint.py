"""Checkpoint I/O: atomic writes, safetensors weights, strict loading that names what is wrong.

Nothing here unpickles code: weights are safetensors, and the only ``torch.load`` calls use
``weights_only=True`` (official ``.pt`` files and our private resume state).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from rae_cli.errors import RaeError


class CheckpointError(RaeError, RuntimeError):
    """A checkpoint or weights file that cannot be used as asked; the message says what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on POSIX).

    On any exception the temporary file is removed and ``path`` is left untouched, so a crash never
    leaves a half-written checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` atomically as safetensors; metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file

    # safetensors refuses shared storage and non-contiguous tensors; a detached contiguous copy is safe.
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file: (tensors, metadata with JSON values decoded where possible)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        tensors = {}
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    for k, v in list(meta.items()):
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            pass
    return tensors, meta


def torch_load_weights(path: str | os.PathLike) -> Any:
    """``torch.load`` that never executes code (``weights_only=True``), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be loaded safely with torch.load(weights_only=True): {e}. "
            "Only plain tensors/dicts are accepted; convert the file or re-export it as a state dict."
        ) from e


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to a temp file then rename (for private resume state and official-layout exports)."""
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))


def check_keys(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Raise CheckpointError naming missing and unexpected keys (a strict load, never a silent skip)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if not missing and not unexpected:
        return

    def show(keys: list[str]) -> str:
        head = ", ".join(keys[:8])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    raise CheckpointError(
        f"{what} does not match the model ({'; '.join(parts)}). "
        "Check that the checkpoint and the preset/config describe the same architecture."
    )


def strict_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module`` with every key used and none missing, and matching shapes."""
    expected = module.state_dict()
    check_keys(expected, state_dict, what)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{what} has tensors of the wrong shape: " + "; ".join(bad[:6])
                              + ". Check that the checkpoint and the preset/config describe the same architecture.")
    module.load_state_dict(state_dict, strict=True)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=("module.", "_orig_mod.")) -> dict:
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, wherever they occur."""
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            k = k.replace(p, "")
        out[k] = v
    return out
