"""Several overfit-probe models at once on the CPU: one process per model (a tiny model's step is many small ops that
one core runs best; separate processes use the other cores without sharing an interpreter lock)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from rae_cli.errors import RaeError

Report = Callable[[str, int, float], None]  # (label, steps done, training loss) → progress display


def resolved_workers(cfg, device: torch.device, runs: int) -> int:
    """How many models train at once: 1 on a GPU; on the CPU ``cfg.workers`` or one per ``cpu_threads`` cores."""
    import os

    if device.type != "cpu":
        return 1
    if cfg.workers is not None:
        return max(1, min(cfg.workers, runs))
    if cfg.cpu_threads is None:  # torch's default threads already use every core
        return 1
    return max(1, min(runs, (os.cpu_count() or 1) // cfg.cpu_threads))




_REPORTS = None  # the progress queue of a worker process


def _worker_init(queue, threads: int | None) -> None:
    global _REPORTS
    _REPORTS = queue
    if threads:
        torch.set_num_threads(threads)


def _worker_run(cfg, latent: torch.Tensor, depth: int, width: int):
    pending: list[float] = []
    label = f"d={width} L={depth}"

    def report(_label: str, _steps: int, loss: float) -> None:
        pending.append(loss)
        if len(pending) == 10:  # one message per 10 steps keeps the queue cheap
            _REPORTS.put((label, len(pending), sum(pending) / len(pending)))
            pending.clear()

    from rae_cli.probe import probe_one

    row = probe_one(cfg, latent, depth, width, report)
    if pending:
        _REPORTS.put((label, len(pending), sum(pending) / len(pending)))
    return row


def run_in_processes(cfg, latent: torch.Tensor, runs: list[tuple[int, int]], workers: int,
                      report: Report) -> list:
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    reports = ctx.Queue()

    def drain(timeout: float) -> None:
        try:
            while True:
                report(*reports.get(timeout=timeout))
                timeout = 0.0
        except queue_mod.Empty:
            pass

    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(reports, cfg.cpu_threads)) as pool:
        # Widest and deepest first, so that the long runs do not end up last on one worker.
        order = sorted(runs, key=lambda r: r[0] * r[1], reverse=True)
        futures = {run: pool.submit(_worker_run, cfg, latent, *run) for run in order}
        while not all(f.done() for f in futures.values()):
            drain(0.2)
        drain(0.0)
        try:
            return [futures[run].result() for run in runs]
        except BrokenProcessPool as e:
            raise RaeError("a probe worker process died. Worker processes re-import the calling script: guard a "
                           "script that calls run_probe with `if __name__ == \"__main__\":`, or set workers=1") from e


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: unchanged), restoring the previous number afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

