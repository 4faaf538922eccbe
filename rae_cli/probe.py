"""The width diagnostic of Theorem 1 (paper §4.1, Table 3): overfit one latent with DiTs of several widths.

A transformer of width d writes each output token through Linear(d → n), so every token it predicts lies in one
d-dimensional affine subspace of R^n; on n-channel tokens with d < n the flow-matching loss cannot reach 0, even for
a single latent. This module trains such models (same model code and objective as ``train-dit``), measures the
final loss, and compares it with the paper's bound max(0, (n − d)/n) and with the exact floor of that one latent.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, List, Optional

import torch

from rae_cli.config import ConfigError, doc
from rae_cli.errors import RaeError
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig

log = logging.getLogger(__name__)

CSV_HEADER = ("width", "depth", "latent_dim", "final_loss", "bound", "exact_bound")


def _probe_dit() -> DiTConfig:
    # Small models reach the floor much sooner with a learnable position embedding (each token can carry its own
    # offset) and without the parameter-free final norm (the output gain can grow as 1/t). The DiT presets keep the
    # paper's architecture; only the probe changes these.
    return DiTConfig(name="DiT-S", learn_pos_embed=True, final_norm=False, allow_narrow=True, class_dropout_prob=0.0)


def _probe_flow() -> FlowConfig:
    return FlowConfig(time_dist="uniform", shift=1.0)


@dataclass
class ProbeConfig:
    """``rae overfit-probe``: overfit one latent with DiTs of several widths and compare with Theorem 1's floors."""

    preset_kind: ClassVar[str] = "overfit-probe"

    image: Optional[str] = doc("Overfit the latent of this image under the `rae` section; null = a synthetic "
                               "N(0, 1) latent of latent_channels × grid × grid.", None)
    latent_channels: int = doc("Channels n of the synthetic latent (ignored with an image).", 32)
    grid: int = doc("Side of the synthetic latent's token grid (h = w; ignored with an image).", 4)
    rae: RAEConfig = doc("The autoencoder that encodes `image` (a string names an rae preset).", factory=RAEConfig)
    widths: List[int] = doc("Model widths d to train (multiples of 4: 2-D RoPE needs head dims divisible by 4).",
                            factory=lambda: [8, 16, 32, 64])
    depths: List[int] = doc("Model depths (number of blocks) to train at every width.", factory=lambda: [2])
    head_dim: int = doc("Target attention head dim: heads = width // head_dim (at least 1, head dim a multiple of 4).",
                        8)
    dit: DiTConfig = doc("Model family and options (name picks LightningDiT; widths/depths/heads are set per run).",
                         factory=_probe_dit)
    flow: FlowConfig = doc("Training time distribution (the final loss is always measured at uniform t).",
                           factory=_probe_flow)
    steps: int = doc("Optimizer steps per model.", 1500)
    batch_size: int = doc("(noise, time) draws per step, all on the one latent.", 32)
    lr: float = doc("Peak AdamW learning rate (linear warmup from 0, then cosine to 0).", 1e-2)
    warmup_steps: int = doc("Linear warmup steps.", 50)
    betas: List[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.99])
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    eval_samples: int = doc("Fresh (noise, uniform t) draws for the final loss, the same draws for every model.",
                            4096)
    fit_tolerance: float = doc("A model with d ≥ n 'fits' when its final loss is within this of its exact floor.",
                               0.1)
    seed: int = doc("Seed of the synthetic latent, the model inits, the training and the evaluation draws.", 0)
    device: str = doc("auto, cpu or cuda.", "auto")
    workers: Optional[int] = doc("Models trained at once, one process each, on the CPU (a GPU trains one at a "
                                 "time); null = one per cpu_threads cores (1 if cpu_threads is null).", None)
    cpu_threads: Optional[int] = doc("torch CPU threads while the probe runs on the CPU; null = torch's default. 1 "
                                     "suits the small models: their steps are many tiny ops that extra threads "
                                     "cannot split, and on a busy machine idle threads spin.", 1)

    def validate(self) -> None:
        if not self.widths or any(w < 4 or w % 4 for w in self.widths):
            raise ConfigError(f"widths must be multiples of 4 (2-D RoPE needs head dims divisible by 4), "
                              f"got {list(self.widths)}")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ConfigError(f"depths must be ≥ 1, got {list(self.depths)}")
        if self.image is None and (self.latent_channels < 1 or self.grid < 1):
            raise ConfigError("latent_channels and grid must be ≥ 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers must be ≥ 1 (or null: one per cpu_threads cores)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError("cpu_threads must be ≥ 1 (or null for torch's default)")
        if self.head_dim < 4 or self.head_dim % 4:
            raise ConfigError(f"head_dim must be a multiple of 4, got {self.head_dim}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ConfigError("steps, batch_size and eval_samples must be ≥ 1")
        if self.lr <= 0 or len(self.betas) != 2:
            raise ConfigError("lr must be > 0 and betas a pair [β1, β2]")
        if self.dit.patch_size != 1:
            raise ConfigError("the probe's floors are for patch size 1 (one token per latent position); "
                              f"got dit.patch_size={self.dit.patch_size}")
        if self.dit.name.startswith("DiT-DH"):
            raise ConfigError(f"dit.name={self.dit.name!r}: the probe varies one width, use a LightningDiT name "
                              "(DiT-S, DiT-B, DiT-L, DiT-XL; only the class matters, sizes are set per run)")


# ----------------------------------------------------------------------------------------------------------------
# The two floors


def paper_bound(n: int, d: int) -> float:
    """Theorem 1's lower bound on the single-image loss: max(0, (n − d)/n)."""
    return max(0.0, (n - d) / n)


def exact_floor(latent: torch.Tensor, d: int) -> float:
    """The smallest loss any model whose output tokens lie in a d-dim affine subspace can reach on this latent.

    The model's last layer is Linear(d → n) with a bias, so every output token lies in S = b + span(Q), Q ∈ R^{n×d}
    orthonormal, whatever comes before it. latent: (n, h, w), one data point X with N = h·w tokens X_i ∈ R^n. Given
    t > 0 and x_t = (1 − t)·X + t·ε the noise ε is determined, so the best a model can do is the orthogonal
    projection of each target y_i = ε_i − X_i onto S, at every t alike. The loss is

        E Σ_i ‖P⊥(ε_i − X_i − b)‖² / (N·n) = [N·(n − d) + Σ_i ‖P⊥(X_i + b)‖²] / (N·n),

    the cross term vanishing since E ε = 0. The noise part does not depend on Q (ε is isotropic), so the best S fits
    the data: −b = the token mean (the bias is free, so all d directions go to the centred tokens) and Q = their top-d
    principal directions, leaving R_d = the sum of all but the d largest eigenvalues of Σ_i (X_i − X̄)(X_i − X̄)ᵀ:

        floor = max(0, n − d)/n + R_d / (N·n).

    The centred tokens span at most N − 1 dimensions, so R_d = 0 and the floor equals the paper's bound once
    d ≥ N − 1 (e.g. N = 256 tokens at 256²); with few tokens and small d it is higher.
    """
    return exact_floors(latent, [d])[0]


def exact_floors(latent: torch.Tensor, widths) -> list[float]:
    """:func:`exact_floor` for several widths from one eigen-decomposition."""
    if latent.dim() != 3:
        raise ValueError(f"expected one latent (n, h, w), got shape {tuple(latent.shape)}")
    n = latent.shape[0]
    tokens = latent.detach().reshape(n, -1).T.double().cpu()  # (N, n)
    N = tokens.shape[0]
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    # Eigenvalues of the centred scatter matrix, from the smaller of the two Gram matrices (same nonzero spectrum).
    gram = centred @ centred.T if N <= n else centred.T @ centred
    eig = torch.linalg.eigvalsh(gram).flip(0)  # descending
    eig = torch.where(eig > 1e-12 * eig[0].clamp(min=1e-300), eig, torch.zeros_like(eig))  # round-off → exact 0
    tail = torch.cat([eig.flip(0).cumsum(0).flip(0), eig.new_zeros(1)])  # tail[k] = Σ_{j ≥ k} eig[j] = R_k
    return [paper_bound(n, d) + float(tail[min(max(d, 0), len(eig))]) / (N * n) for d in widths]


# ----------------------------------------------------------------------------------------------------------------
# Latents and models


def synthetic_latent(channels: int, grid: int, seed: int) -> torch.Tensor:
    """A fixed N(0, 1) latent (channels, grid, grid) drawn from the probe seed."""
    from rae_cli.distributed import generator

    return torch.randn(channels, grid, grid, generator=generator(seed, 0))


def image_latent(rae_cfg: RAEConfig, image: str | Path, device: torch.device) -> torch.Tensor:
    """The (normalised, if the RAE has statistics) latent (C, h, w) of one image, ADM center-cropped."""
    from rae_cli.build import build_rae
    from rae_cli.data import load_image, open_rgb

    open_rgb(image)  # a missing or unreadable image fails before the autoencoder is built
    rae = build_rae(rae_cfg, device=device, decoder_weights=False).eval()
    x = load_image(image, rae.image_size, crop="adm")  # (3, H, W) in [0, 1]
    return rae.encode(x[None].to(device))[0].float()


def heads_for(width: int, head_dim: int) -> int:
    """Attention heads for ``width``: about width // head_dim, with a head dim that divides the width and is a
    multiple of 4 (2-D RoPE rotates pairs along two axes)."""
    heads = max(1, width // head_dim)
    while heads > 1 and (width % heads or (width // heads) % 4):
        heads -= 1
    return heads


@contextlib.contextmanager
def _narrow_models_expected():
    """The model builder warns loudly about d < n (Theorem 1); here narrow models are the point of the probe."""
    dit_log = logging.getLogger("rae_cli.dit")
    level = dit_log.level
    dit_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        dit_log.setLevel(level)


def build_probe_model(cfg: ProbeConfig, latent_shape, width: int, depth: int) -> torch.nn.Module:
    """A registry DiT (the train-dit builder) at this width and depth, seeded from (seed, width, depth)."""
    from rae_cli.build import build_dit_model
    from rae_cli.distributed import derive_seed

    dit = dataclasses.replace(cfg.dit, hidden_size=width, depth=depth, num_heads=heads_for(width, cfg.head_dim),
                              allow_narrow=True)
    with torch.random.fork_rng(devices=[]), _narrow_models_expected():
        torch.manual_seed(derive_seed(cfg.seed, 1, width, depth))
        return build_dit_model(dit, latent_shape, num_classes=1)


# ----------------------------------------------------------------------------------------------------------------
# Training and the final loss


def train_model(model: torch.nn.Module, latent: torch.Tensor, cfg: ProbeConfig, gen: torch.Generator,
                on_step: Callable[[float], None] | None = None) -> None:
    """AdamW on the flow-matching loss of ``latent`` (1, n, h, w) with fresh (ε, t) each step (train-dit's loss)."""
    from rae_cli.flow import sample_training_loss
    from rae_cli.lr_schedule import lr_at

    shift = cfg.flow.resolved_shift(latent.shape[1:])
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: one fused update for all parameters (the per-tensor loop dominates a step of a tiny model on CPU).
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)
    x = latent.expand(cfg.batch_size, *latent.shape[1:])  # (B, n, h, w): the same latent in every row
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=latent.device)
    model.train()
    for step in range(cfg.steps):
        lr = lr_at(step, kind="cosine", base_lr=cfg.lr, warmup=cfg.warmup_steps, warmup_from_zero=True,
                   total=cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = sample_training_loss(model, x, {"y": y}, generator=gen, kind=cfg.flow.time_dist,
                                    mu=cfg.flow.logit_mu, sigma=cfg.flow.logit_sigma, t0=cfg.flow.t0,
                                    t1=cfg.flow.t1, shift=shift).mean()
        if not torch.isfinite(loss):
            raise RaeError(f"the probe's loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(loss.item())


@torch.no_grad()
def final_loss(model: torch.nn.Module, latent: torch.Tensor, cfg: ProbeConfig, gen: torch.Generator,
               batch: int = 512) -> float:
    """Mean loss over ``cfg.eval_samples`` fresh (ε, t) draws with t ~ U(t0, t1) and no shift, in eval mode."""
    from rae_cli.flow import sample_training_loss

    model.eval()
    total, done = 0.0, 0
    while done < cfg.eval_samples:
        b = min(batch, cfg.eval_samples - done)
        x = latent.expand(b, *latent.shape[1:])
        y = torch.zeros(b, dtype=torch.long, device=latent.device)
        per_sample = sample_training_loss(model, x, {"y": y}, generator=gen, kind="uniform", t0=cfg.flow.t0,
                                          t1=cfg.flow.t1, shift=1.0)
        total += float(per_sample.double().sum())
        done += b
    return total / done


# ----------------------------------------------------------------------------------------------------------------
# The probe


@dataclass
class ProbeRow:
    width: int
    depth: int
    latent_dim: int
    final_loss: float
    bound: float
    exact_bound: float
    verdict: str
    seconds: float


@dataclass
class ProbeResult:
    rows: list[ProbeRow]
    latent_shape: tuple[int, int, int]
    source: str
    seconds: float
    out_dir: Path
    floor_curve: list[tuple[int, float]]  # (d, exact floor) for every d up to past n and the widest model


def verdict(width: int, n: int, loss: float, floor: float, tolerance: float) -> str:
    """A plain-language reading of one row."""
    if width < n:
        return "cannot fit: width below the latent dimension"
    if loss <= floor + tolerance:
        return "fits"
    return "not fitted yet: width ≥ latent dimension, so it can; train longer or tune lr"


def run_probe(cfg: ProbeConfig, out_dir: str | Path, *, progress: bool = True) -> ProbeResult:
    """Train every (depth, width), measure the final loss, write probe.csv / probe.json / probe.png / config.yaml."""
    from rae_cli.build import device_of
    from rae_cli.config import save_resolved

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_of(cfg.device)
    start = time.perf_counter()
    if cfg.image:
        latent = image_latent(cfg.rae, cfg.image, device)
        source = f"image {cfg.image} (encoder {cfg.rae.encoder})"
    else:
        latent = synthetic_latent(cfg.latent_channels, cfg.grid, cfg.seed).to(device)
        source = f"synthetic N(0, 1) latent {cfg.latent_channels}×{cfg.grid}×{cfg.grid}"
    runs = [(depth, width) for depth in cfg.depths for width in cfg.widths]
    workers = resolved_workers(cfg, device, len(runs))
    with _progress_bar(len(runs) * cfg.steps, progress) as report:
        if workers > 1:
            rows = _run_in_processes(cfg, latent.cpu(), runs, workers, report)
        else:
            with _torch_threads(cfg.cpu_threads if device.type == "cpu" else None):
                rows = [probe_one(cfg, latent, depth, width, report) for depth, width in runs]
    dense = list(range(1, max(max(cfg.widths), latent.shape[0]) * 2 + 1))
    result = ProbeResult(rows, tuple(int(s) for s in latent.shape), source, time.perf_counter() - start, out_dir,
                         list(zip(dense, exact_floors(latent, dense))))
    write_csv(rows, out_dir / "probe.csv")
    write_json(result, cfg, out_dir / "probe.json")
    plot_probe(result, out_dir / "probe.png")
    save_resolved(cfg, out_dir / "config.yaml", extra={"command": "overfit-probe"})
    return result


Report = Callable[[str, int, float], None]  # (label, steps done, training loss) → progress display


def probe_one(cfg: ProbeConfig, latent: torch.Tensor, depth: int, width: int,
              report: Report | None = None) -> ProbeRow:
    """Build, train and measure one model on ``latent`` (n, h, w); ``report(label, steps, loss)`` tracks progress."""
    from rae_cli.distributed import generator

    t_run = time.perf_counter()
    device = latent.device
    n = latent.shape[0]
    model = build_probe_model(cfg, tuple(latent.shape), width, depth).to(device)
    label = f"d={width} L={depth}"
    on_step = None if report is None else (lambda loss: report(label, 1, loss))
    train_model(model, latent[None], cfg, generator(cfg.seed, 2, width, depth, device=device), on_step)
    # The same evaluation draws for every model, so the widths are compared on equal terms.
    loss = final_loss(model, latent[None], cfg, generator(cfg.seed, 3, device=device))
    floor = exact_floor(latent, width)
    log.info("width %d depth %d: final loss %.4f (bound %.4f, exact floor %.4f)", width, depth, loss,
             paper_bound(n, width), floor)
    return ProbeRow(width, depth, n, loss, paper_bound(n, width), floor,
                    verdict(width, n, loss, floor, cfg.fit_tolerance), time.perf_counter() - t_run)


def resolved_workers(cfg: ProbeConfig, device: torch.device, runs: int) -> int:
    """How many models train at once: 1 on a GPU; on the CPU ``cfg.workers`` or one per ``cpu_threads`` cores."""
    import os

    if device.type != "cpu":
        return 1
    if cfg.workers is not None:
        return max(1, min(cfg.workers, runs))
    if cfg.cpu_threads is None:  # torch's default threads already use every core
        return 1
    return max(1, min(runs, (os.cpu_count() or 1) // cfg.cpu_threads))


# ----------------------------------------------------------------------------------------------------------------
# Several models at once on the CPU: one process per model (a tiny model's step is many small ops that one core
# runs best; separate processes use the other cores without sharing an interpreter lock).

_REPORTS = None  # the progress queue of a worker process


def _worker_init(queue, threads: int | None) -> None:
    global _REPORTS
    _REPORTS = queue
    if threads:
        torch.set_num_threads(threads)


def _worker_run(cfg: ProbeConfig, latent: torch.Tensor, depth: int, width: int) -> ProbeRow:
    pending: list[float] = []
    label = f"d={width} L={depth}"

    def report(_label: str, _steps: int, loss: float) -> None:
        pending.append(loss)
        if len(pending) == 10:  # one message per 10 steps keeps the queue cheap
            _REPORTS.put((label, len(pending), sum(pending) / len(pending)))
            pending.clear()

    row = probe_one(cfg, latent, depth, width, report)
    if pending:
        _REPORTS.put((label, len(pending), sum(pending) / len(pending)))
    return row


def _run_in_processes(cfg: ProbeConfig, latent: torch.Tensor, runs: list[tuple[int, int]], workers: int,
                      report: Report) -> list[ProbeRow]:
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
def _torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: unchanged), restoring the previous number afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    """Yield ``report(label, steps, loss)``: advance the bar and show the recent training loss of ``label``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not enabled)
    recent: dict[str, list[float]] = {}

    def report(label: str, steps: int, loss: float) -> None:
        losses = recent.pop(label, [])  # re-inserted last: the dict is ordered by the latest report
        losses.append(loss)
        recent[label] = losses[-20:]
        shown = "  ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in list(recent.items())[-2:])
        bar.update(task, advance=steps, description=f"loss {shown}")

    with bar:
        task = bar.add_task("overfit-probe", total=total)
        yield report


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def write_csv(rows: list[ProbeRow], path: Path) -> None:
    from rae_cli.checkpoint import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        writer.writerow([r.width, r.depth, r.latent_dim, f"{r.final_loss:.6g}", f"{r.bound:.6g}",
                         f"{r.exact_bound:.6g}"])
    atomic_write_text(path, buf.getvalue())


def write_json(result: ProbeResult, cfg: ProbeConfig, path: Path) -> None:
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.config import to_dict

    atomic_write_json(path, {
        "latent": {"source": result.source, "shape": list(result.latent_shape), "latent_dim": result.latent_shape[0],
                   "tokens": result.latent_shape[1] * result.latent_shape[2]},
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "seconds": result.seconds,
        "config": to_dict(cfg),
    })


def plot_probe(result: ProbeResult, path: Path) -> None:
    """Final loss against width (one line per depth) with both floors and the d = n line; linear and log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rae_cli.checkpoint import atomic_path

    n = result.latent_shape[0]
    widths = sorted({r.width for r in result.rows})
    lo, hi = min(widths) / 1.5, max(max(widths), n) * 1.5
    curve = [(d, f) for d, f in result.floor_curve if lo <= d <= hi]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100)
    for ax, log_y in zip(axes, (False, True)):
        ds = [d for d, _ in curve]
        bound = [paper_bound(n, d) for d in ds]
        exact = [f for _, f in curve]
        if log_y:  # zero floors cannot be drawn on a log axis
            bound = [b if b > 0 else float("nan") for b in bound]
            exact = [f if f > 0 else float("nan") for f in exact]
        ax.plot(ds, bound, color="tab:gray", lw=2.5, ls="--", label="paper bound max(0, (n − d)/n)")
        ax.plot(ds, exact, color="tab:red", lw=1.5, label="exact floor for this latent")
        for depth in sorted({r.depth for r in result.rows}):
            rows = sorted((r for r in result.rows if r.depth == depth), key=lambda r: r.width)
            ax.plot([r.width for r in rows], [r.final_loss for r in rows], marker="o", lw=2,
                    label=f"final loss, depth {depth}")
            for r in rows:
                ax.annotate(f"{r.final_loss:.3g}", (r.width, r.final_loss), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        ax.axvline(n, color="black", lw=1, alpha=0.7)
        ax.text(n, 0.97, f" d = n = {n}", va="top", ha="left", fontsize=9, transform=ax.get_xaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlim(lo, hi)
        if log_y:
            ax.set_yscale("log")
            ax.set_title("log scale", fontsize=9)
        else:
            ax.set_ylim(-0.02, max(1.05, max(r.final_loss for r in result.rows) * 1.1))
            ax.set_title(f"one latent: {result.source}", fontsize=9)
        ax.set_xlabel("model width d")
        ax.set_ylabel("final flow-matching loss (fresh draws, uniform t)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Checking a train-dit preset without training


@dataclass
class PresetCheck:
    preset: str
    encoder: str
    latent_channels: int
    tokens: int
    model: str
    hidden_size: Any
    width: int
    bound: float
    ok: bool

    def message(self) -> str:
        head = (f"{self.model} (hidden {self.hidden_size}; the output is written at width d = {self.width}) on "
                f"{self.encoder} latents ({self.latent_channels} channels, {self.tokens} tokens): ")
        if self.ok:
            body = self.hidden_size[0] if isinstance(self.hidden_size, list) else self.width
            note = (f"; its body ({body} wide) is narrower, which is fine: the wide head reads the noisy latent "
                    "itself (paper §4.3)" if body < self.latent_channels else "")
            return head + f"d ≥ n, so Theorem 1 does not limit the loss (bound {self.bound:g}){note}"
        return head + (f"d < n: by Theorem 1 the loss cannot go below (n − d)/n = {self.bound:.3f}, even on one "
                       "image; use a wider model or a DiT-DH head at least n wide")


def encoder_geometry(rae_cfg: RAEConfig) -> tuple[int, int]:
    """(hidden size, patch size) of the RAE's encoder from the registry or a local config.json, without weights."""
    from rae_cli.build import resolve_source
    from rae_cli.encoders import EFFNET_STAGES, ENCODERS

    source = resolve_source(rae_cfg.encoder_source)
    if source and (Path(source) / "config.json").is_file():
        cfg = json.loads((Path(source) / "config.json").read_text())
        return int(cfg["hidden_size"]), int(cfg["patch_size"])
    if rae_cfg.encoder == "efficientnet-lite0":
        stride = int(rae_cfg.encoder_options.get("stride", 8))
        return EFFNET_STAGES[stride][1], stride
    spec = ENCODERS.get(rae_cfg.encoder)
    if spec is None or "hidden_size" not in spec.config:
        raise ConfigError(f"cannot tell the latent channels of encoder {rae_cfg.encoder!r} without its weights; "
                          f"registry encoders: {', '.join(ENCODERS)}")
    return int(spec.config["hidden_size"]), int(spec.config["patch_size"])


def _section(cls: type, value: Any):
    from rae_cli.config import resolve

    if value is None:
        return resolve(cls)
    if isinstance(value, str):
        return resolve(cls, preset=value)
    return resolve(cls, base=value)


def check_train_preset(preset: str) -> PresetCheck:
    """Read a train-dit preset's ``dit`` and ``rae`` sections and apply Theorem 1's width rule to them."""
    from rae_cli.config import preset_path, read_yaml
    from rae_cli.dit import DIT_REGISTRY, DiTDH

    path = preset_path("train-dit", preset)
    data = read_yaml(path)
    dit = _section(DiTConfig, data.get("dit"))
    rae = _section(RAEConfig, data.get("rae"))
    channels, patch = encoder_geometry(rae)
    n = channels * dit.patch_size**2  # the token a patch-p DiT reads and writes
    if dit.name not in DIT_REGISTRY:
        raise ConfigError(f"{path}: unknown model {dit.name!r}; choose one of {', '.join(DIT_REGISTRY)}")
    cls, hidden, _, _ = DIT_REGISTRY[dit.name]
    hidden = dit.hidden_size if dit.hidden_size is not None else hidden
    # As in build_dit: DiT-DH writes its output from the head, so the head width is the one that counts.
    pair = isinstance(hidden, (list, tuple))
    width = int(hidden[1] if pair and cls is DiTDH else hidden[0] if pair else hidden)
    grid = rae.encoder_input_size // patch // dit.patch_size
    return PresetCheck(preset=preset, encoder=rae.encoder, latent_channels=n, tokens=grid * grid, model=dit.name,
                       hidden_size=list(hidden) if pair else hidden, width=width,
                       bound=paper_bound(n, width), ok=width >= n)
