"""``rae encode`` and ``rae recon``: images through the Representation Autoencoder (spec §1.3–1.4).

encode: images → normalised latents (B, C, h, w) in one safetensors file (written atomically at the end).
recon:  images → reconstructions (per-image PNGs + a side-by-side grid) and PSNR/SSIM (and rFID) as JSON.
Every input image is decoded once before any output is written, so a corrupt file fails with nothing half-written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rae_cli.config import save_resolved
from rae_cli.errors import DataError
from rae_cli.schema import EncodeConfig, ReconConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_readable(files: list[Path]) -> None:
    """Open every image once (cheap) so that corrupt files are reported, all at once, before anything is written."""
    from rae_cli.data import open_rgb

    bad = []
    for f in files:
        try:
            open_rgb(f)
        except DataError as e:
            bad.append(str(e))
    if bad:
        more = f"; ... ({len(bad)} in all)" if len(bad) > 8 else ""
        raise DataError(f"{len(bad)} of {len(files)} input images cannot be used: " + "; ".join(bad[:8]) + more
                        + ". Remove or replace them and run again (nothing was written)")


def _image_size(cfg_size: int | None, rae) -> int:
    return int(cfg_size) if cfg_size else int(rae.image_size)


def _batches(files: list[Path], batch_size: int):
    for i in range(0, len(files), batch_size):
        yield i, files[i:i + batch_size]


def _progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False), total


def encode_images(cfg: EncodeConfig, input_path: str | Path, out_dir: str | Path) -> Path:
    """Encode an image or a folder of images; returns the path of ``latents.safetensors``."""
    from rae_cli.build import build_rae, device_of
    from rae_cli.checkpoint import save_safetensors
    from rae_cli.data import list_images, load_batch

    files = list_images(input_path)
    _check_readable(files)
    device = device_of(cfg.device)
    rae = build_rae(cfg.rae, device=device, parts={"encoder"}).eval()
    size = _image_size(cfg.image_size, rae)
    latents = []
    progress, total = _progress(len(files), "encode")
    with progress, torch.no_grad():
        task = progress.add_task("encode", total=total)
        for _, chunk in _batches(files, cfg.batch_size):
            crop = "none" if cfg.crop == "none" else cfg.crop
            x, _, _ = load_batch(chunk, None if crop == "none" else size, crop=crop)
            z = rae.encode(x.to(device))  # (B, C, h, w), normalised with the RAE's stats if it has any
            latents.append(z.to(DTYPES[cfg.dtype]).cpu())
            progress.advance(task, len(chunk))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "latents.safetensors"
    meta = {
        "files": [str(f) for f in files],
        "latent_shape": list(latents[0].shape[1:]),
        "normalized": rae.has_stats,
        "encoder": cfg.rae.encoder,
        "encoder_random_init": bool(cfg.rae.encoder_random_init),
    }
    save_safetensors(out, {"latents": torch.cat(latents)}, metadata=meta)
    save_resolved(cfg, out_dir / "config.yaml", extra={"command": "encode", "input": str(input_path)})
    return out


def reconstruct_images(cfg: ReconConfig, input_path: str | Path, out_dir: str | Path) -> dict:
    """Reconstruct images; write ``recon/*.png``, ``grid.png`` and ``metrics.json``; return the metrics."""
    from rae_cli.build import build_rae, device_of
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.data import list_images, load_batch, make_grid, save_image
    from rae_cli.metrics import psnr, ssim

    files = list_images(input_path)
    _check_readable(files)
    device = device_of(cfg.device)
    rae = build_rae(cfg.rae, device=device).eval()
    if not cfg.rae.decoder_weights:
        log.warning("no decoder weights given (rae.decoder_weights): reconstructions come from a RANDOM decoder")
    size = _image_size(cfg.image_size, rae)
    out_dir = Path(out_dir)
    recon_dir = out_dir / "recon"
    recon_dir.mkdir(parents=True, exist_ok=True)
    per_image, grid_pairs = [], []
    # The grid shows grid_images inputs spread evenly over the whole input list (not just the first folder).
    n_grid = min(cfg.grid_images, len(files))
    grid_idx = {round(k * (len(files) - 1) / max(n_grid - 1, 1)) for k in range(n_grid)} if n_grid else set()
    originals_u8, recons_u8 = [], []
    progress, total = _progress(len(files), "recon")
    with progress, torch.no_grad():
        task = progress.add_task("recon", total=total)
        for start, chunk in _batches(files, cfg.batch_size):
            x, _, _ = load_batch(chunk, size, crop=cfg.crop)
            x = x.to(device)
            y = rae.decode(rae.encode(x)).float().clamp(0, 1)
            if y.shape[-2:] != x.shape[-2:]:
                # An upsampling decoder (2× patch) makes larger images: compare at the output size.
                x = torch.nn.functional.interpolate(x, size=y.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            p, s = psnr(y, x), ssim(y, x)
            for j, f in enumerate(chunk):
                name = f"{start + j:06d}_{f.stem}.png"
                save_image(y[j], recon_dir / name)
                per_image.append({"file": str(f), "recon": f"recon/{name}", "psnr": float(p[j]), "ssim": float(s[j])})
            for j in range(len(chunk)):
                if start + j in grid_idx:
                    grid_pairs.append((x[j].cpu(), y[j].cpu()))
            if cfg.rfid:
                originals_u8.append(_to_uint8(x))
                recons_u8.append(_to_uint8(y))
            progress.advance(task, len(chunk))
    if grid_pairs:
        # Each row: original | reconstruction, side by side.
        cols = 2 * min(4, len(grid_pairs))
        images = torch.stack([im for pair in grid_pairs for im in pair])
        save_image(make_grid(images, nrow=cols), out_dir / "grid.png")
    metrics = {
        "num_images": len(per_image),
        "psnr_mean": _finite_mean([r["psnr"] for r in per_image]),
        "ssim_mean": _finite_mean([r["ssim"] for r in per_image]),
        "encoder": cfg.rae.encoder,
        "encoder_random_init": bool(cfg.rae.encoder_random_init),
        "decoder_weights": cfg.rae.decoder_weights,
        "per_image": per_image,
    }
    if cfg.rfid:
        from rae_cli.evaluate import rfid

        metrics["rfid"] = rfid(torch.cat(recons_u8).numpy(), torch.cat(originals_u8).numpy(), device=str(device))
    atomic_write_json(out_dir / "metrics.json", metrics)
    save_resolved(cfg, out_dir / "config.yaml", extra={"command": "recon", "input": str(input_path)})
    return metrics


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    from rae_cli.npz import to_uint8

    return torch.as_tensor(to_uint8(x))


def _finite_mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        raise DataError("no finite metric values")
    return sum(vals) / len(vals)
