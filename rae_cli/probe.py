"""The width diagnostic of Theorem 1 (paper §4.1, Table 3): overfit one latent with DiTs of several widths.

A transformer of width d writes each output token through Linear(d → n), so every token it predicts lies in one
d-dimensional affine subspace of R^n; on n-channel tokens with d < n the flow-matching loss cannot reach 0, even for
a single latent. This module trains such models (same model code and objective as ``train-dit``), measures the
final loss, and compares it with the paper's bound max(0, (n − d)/n) and with the exact floor of that one latent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, List, Optional

import torch

from rae_cli.config import ConfigError, doc
from rae_cli.schema import DiTConfig, FlowConfig, RAEConfig
# The floors, the worker processes, the outputs and the preset check live in their own modules; their public names
# are importable from here too.
from rae_cli.probe_floors import exact_floor, exact_floors, paper_bound  # noqa: F401
from rae_cli.probe_presets import PresetCheck, check_train_preset, encoder_geometry  # noqa: F401
from rae_cli.probe_report import CSV_HEADER, plot_probe, write_csv, write_json  # noqa: F401
from rae_cli.probe_workers import Report, resolved_workers  # noqa: F401

log = logging.getLogger(__name__)


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
    rae = build_rae(rae_cfg, device=device, parts={"encoder"}).eval()
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
            from rae_cli.training.guard import NonFiniteError

            raise NonFiniteError(f"the probe's loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
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
    from rae_cli.probe_workers import run_in_processes, torch_threads

    with _progress_bar(len(runs) * cfg.steps, progress) as report:
        if workers > 1:
            rows = run_in_processes(cfg, latent.cpu(), runs, workers, report)
        else:
            with torch_threads(cfg.cpu_threads if device.type == "cpu" else None):
                rows = [probe_one(cfg, latent, depth, width, report) for depth, width in runs]
    dense = list(range(1, max(max(cfg.widths), latent.shape[0]) * 2 + 1))
    result = ProbeResult(rows, tuple(int(s) for s in latent.shape), source, time.perf_counter() - start, out_dir,
                         list(zip(dense, exact_floors(latent, dense))))
    write_csv(rows, out_dir / "probe.csv")
    write_json(result, cfg, out_dir / "probe.json")
    plot_probe(result, out_dir / "probe.png")
    save_resolved(cfg, out_dir / "config.yaml", extra={"command": "overfit-probe"})
    return result


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



@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    """Yield ``report(label, steps, loss)``: advance the bar and show the recent training loss of ``label``."""
    from rae_cli.training.session import progress_bar

    bar = progress_bar("overfit-probe", enabled, info=False)
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
