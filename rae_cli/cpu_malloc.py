"""Keep freed memory in the process on CPU runs, as the CUDA caching allocator does on a GPU.

glibc's malloc serves every allocation above 32 MiB with its own ``mmap`` and hands it back on ``free``, and trims the
top of its heap whenever enough is free there. A training step allocates and frees gigabytes of activations and
gradients in blocks of that size, so every step the kernel zero-fills the same pages again: on a DiT-DH-S step at
batch 8 that is 0.5–1.1 million minor page faults and ~8 % of the step time (``benchmarks/speed_at_equal_math.py``
measures it; with the two settings below they drop to none after the first step). The math is untouched: results
are bit-identical. The price is that the process keeps its peak resident memory until it exits instead of handing
some back between steps (on that step: peak RSS 7.36 GiB vs 6.9–7.1 GiB).

Applied by :func:`rae_cli.distributed.init` when a command runs on the CPU. ``RAE_CPU_MALLOC=system`` keeps glibc's
defaults. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

from rae_cli.config import ConfigError

log = logging.getLogger(__name__)

ENV = "RAE_CPU_MALLOC"
CHOICES = ("keep", "system")

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def mode() -> str:
    """``RAE_CPU_MALLOC``: ``keep`` (default) or ``system``; anything else is an error naming both."""
    value = os.environ.get(ENV, "keep").strip().lower() or "keep"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(CHOICES)} (unset = keep)")
    return value


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from its heap (no per-block ``mmap``) and never trim the heap, once per
    process. Returns whether the setting is in effect (False: ``RAE_CPU_MALLOC=system``, or not glibc)."""
    global _applied
    if mode() == "system":
        return False
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. M_MMAP_MAX = 0: no block gets its own mapping (a thread arena that cannot hold
    # a block falls back to the main heap). M_TRIM_THRESHOLD = -1: the heap is never trimmed.
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    if _applied:
        log.debug("CPU run: freed memory is kept for reuse (%s=system to turn off)", ENV)
    return _applied
