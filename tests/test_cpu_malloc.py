"""CPU runs keep freed memory for reuse (rae_cli/cpu_malloc.py): a training-like pattern of large allocations stops
page-faulting after the first rounds; RAE_CPU_MALLOC=system leaves glibc's defaults. Each case runs in a fresh
process (the setting is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc's malloc only")

# Rounds of 48 + 12 + 96 + 4 MiB tensors, allocated, written and freed, like one step's activations. Prints the
# minor page faults of each of 5 rounds after 3 warm-up rounds, in 4 KiB pages (160 MiB a round = 40960 pages).
SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    if sys.argv[1] == "init":
        from rae_cli import distributed
        distributed.init("cpu")
    else:
        from rae_cli.cpu_malloc import keep_freed_memory
        print("kept", keep_freed_memory())
    def one_round():
        xs = [torch.ones(n) for n in (12 * 2**20, 3 * 2**20, 24 * 2**20, 1 * 2**20)]
        del xs
    for _ in range(3):
        one_round()
    rounds = []
    for _ in range(5):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print("faults", *rounds)
""")
ROUND_PAGES = 160 * 2**20 // 4096


def _faults(how: str, mode: str | None) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "RAE_CPU_MALLOC"}
    if mode is not None:
        env["RAE_CPU_MALLOC"] = mode
    out = subprocess.run([sys.executable, "-c", SCRIPT, how], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(n) for n in out.stdout.split("faults")[-1].split()]


@glibc_only
@pytest.mark.parametrize("how", ["direct", "init"])
def test_cpu_runs_stop_refaulting_freed_memory(how):
    # The quietest round of each: this host's kernel may also reclaim idle pages on its own (DAMON), which can make
    # a kept page fault once more in some round; never in every one.
    kept, system = _faults(how, None), _faults(how, "system")
    assert min(system) > ROUND_PAGES // 2, f"glibc's defaults should re-fault most pages every round: {system}"
    assert min(kept) < ROUND_PAGES // 10, f"kept memory still page-faulted in every round: {kept} of {ROUND_PAGES}"


def test_unknown_mode_is_a_clear_error(monkeypatch):
    from rae_cli.config import ConfigError
    from rae_cli.cpu_malloc import keep_freed_memory

    monkeypatch.setenv("RAE_CPU_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="RAE_CPU_MALLOC='jemalloc' is not one of keep, system"):
        keep_freed_memory()
