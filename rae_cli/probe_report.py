"""The overfit probe's outputs: probe.csv, probe.json and the probe.png plot of final loss vs width."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from rae_cli.probe_floors import paper_bound

CSV_HEADER = ("width", "depth", "latent_dim", "final_loss", "bound", "exact_bound")


def write_csv(rows: list, path: Path) -> None:
    from rae_cli.checkpoint import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        writer.writerow([r.width, r.depth, r.latent_dim, f"{r.final_loss:.6g}", f"{r.bound:.6g}",
                         f"{r.exact_bound:.6g}"])
    atomic_write_text(path, buf.getvalue())


def write_json(result, cfg, path: Path) -> None:
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.config import to_dict

    atomic_write_json(path, {
        "latent": {"source": result.source, "shape": list(result.latent_shape), "latent_dim": result.latent_shape[0],
                   "tokens": result.latent_shape[1] * result.latent_shape[2]},
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "seconds": result.seconds,
        "config": to_dict(cfg),
    })


def plot_probe(result, path: Path) -> None:
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
