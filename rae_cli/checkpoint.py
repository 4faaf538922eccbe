"""Checkpoint I/O: durable atomic writes, safetensors weights, strict loading that names what is wrong.

Every file the package writes goes through :func:`atomic_path`: a temporary file next to the target, fsynced,
given the mode the user's umask asks for, renamed over the target, and the folder fsynced — so after a crash or a
power cut the target holds either the old or the new content, never a torn or zero-length file (on filesystems that
honour fsync). Nothing here unpickles code: weights are safetensors, and the only ``torch.load`` calls use
``weights_only=True`` (official ``.pt`` files and our private resume state).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from rae_cli.errors import RaeError


class CheckpointError(RaeError, RuntimeError):
    """A checkpoint or weights file that cannot be used as asked; the message says what to do."""


def _umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (a no-op error on filesystems that cannot)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to the disk; silently skipped where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) cannot fsync a folder
    finally:
        os.close(fd)


def durable_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` (a file or a folder), then fsync the destination folder so the rename itself survives."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success make it durable and rename it over ``path``.

    The temporary file is fsynced before the rename and the folder after it, and it gets the mode the user's
    umask asks for (``mkstemp`` alone would leave 0600). On any exception the temporary file is removed and
    ``path`` is left untouched, so a crash never leaves a half-written file behind. ``durable=False`` skips the
    two fsyncs (about 10 ms per file on a busy ext4 disk) for bulk outputs whose reader checks each file for
    completeness instead (the PNGs of ``rae sample``, the PNGs of ``rae dataset``): still atomic against a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.chmod(tmp, file_mode())
        if durable:
            durable_replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` has a readable safetensors header and is as long as it says.

    Cheap (reads the header only): catches zero-length and truncated files without loading any tensor.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        need = 8 + n + max(ends, default=0)
        if size < need:
            raise ValueError(f"truncated: {size} bytes of {need}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{path} is not a complete safetensors file ({e})") from e


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


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6 writes a zip archive; older versions a pickle (0x80)


def torch_load_weights(path: str | os.PathLike) -> Any:
    """``torch.load`` that never executes code (``weights_only=True``), with a one-line error.

    A file that is not a ``torch.save`` archive at all is called that ("not a PyTorch checkpoint"); a pickle that
    asks for anything beyond tensors and plain containers is refused without running it (torch's own message
    suggests ``weights_only=False``, which would run the pickle's code: we never pass that advice on).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
                              f"{path.stat().st_size} bytes): check the path, or download the file again")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        detail = detail.split(". ")[0].rstrip(".") or "unsupported pickle content"  # without torch's advice
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it holds pickled Python objects, not only tensors "
            f"and plain containers ({detail}); loading it would run code, so it was not loaded. Use a file saved as "
            "a plain state dict (or safetensors) from a source you trust."
        ) from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first}); it may be truncated or "
                              "damaged: download or copy it again") from None


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


def strict_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint",
                *, assign: bool = False) -> None:
    """Load ``state_dict`` into ``module`` with every key used and none missing, and matching shapes.

    ``assign=True`` materialises a module built on the meta device: its tensors become the loaded ones (cast to
    the module's dtypes, as a copying load would), so no random initialisation is ever made and thrown away.
    """
    expected = module.state_dict()
    check_keys(expected, state_dict, what)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{what} has tensors of the wrong shape: " + "; ".join(bad[:6])
                              + ". Check that the checkpoint and the preset/config describe the same architecture.")
    if not assign:
        module.load_state_dict(state_dict, strict=True)
        return
    state_dict = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    for sub in module.modules():  # non-persistent buffers are in no state dict: their module recomputes them
        if hasattr(sub, "materialize_buffers") and any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.materialize_buffers()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer without materialize_buffers: such a module cannot be built on meta
        raise CheckpointError(f"{what}: {', '.join(left[:6])} still have no values after loading")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=("module.", "_orig_mod.")) -> dict:
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, wherever they occur."""
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            k = k.replace(p, "")
        out[k] = v
    return out
