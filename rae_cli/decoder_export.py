"""What a train-decoder run gives back: the held-out PSNR/SSIM check and the export of a trained decoder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from rae_cli.errors import RaeError

log = logging.getLogger(__name__)

RUN_KIND = "train-decoder"
EXPORT_DIR = "export"


@torch.no_grad()
def evaluate(rae_eval, images: torch.Tensor, grid_path: Path | None = None, batch_size: int = 16) -> dict[str, float]:
    """PSNR/SSIM of ``rae_eval``'s reconstructions of ``images`` (B, 3, S, S) in [0, 1]; saves an input/recon grid.

    ``rae_eval`` is an RAE in eval mode (no latent noise; the official eval of the live model ran in train mode,
    spec §10.1 #7). Reconstructions are clamped and quantised to 8 bits before scoring, like saved images.
    """
    from rae_cli.data import make_grid, save_image
    from rae_cli.metrics import psnr, ssim

    device = rae_eval.image_mean.device
    recon = torch.cat([rae_eval(images[i:i + batch_size].to(device)).float().clamp(0, 1).cpu()
                       for i in range(0, len(images), batch_size)])
    recon = recon.mul(255).round().div(255)
    result = {"psnr": psnr(recon, images).mean().item(), "ssim": ssim(recon, images).mean().item()}
    if grid_path is not None:
        n = min(8, len(images))
        save_image(make_grid(torch.cat([images[:n], recon[:n]]), nrow=n), _mkparent(grid_path))
    return result


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path



def export_trained_decoder(checkpoint: str | Path, out_dir: str | Path | None = None, *,
                           use_ema: bool = True) -> Path:
    """A train-decoder checkpoint (or run folder) → ``decoder.safetensors`` (ours), ``model.pt`` (official layout)
    and ``rae.yaml`` (an rae preset using them: ``rae recon --preset OUT/rae.yaml``). Returns the export folder.

    Default ``out_dir``: ``<run>/export``. ``use_ema``: export the EMA weights (as the released decoders are).
    """
    from rae_cli import run_dir
    from rae_cli.checkpoint import atomic_write_text, strict_load
    from rae_cli.config import load_resolved, to_dict
    from rae_cli.decoder import ViTDecoder
    from rae_cli.official import export_decoder_official, save_decoder
    from rae_cli.train_decoder_config import TrainDecoderConfig

    ckpt = run_dir.resolve_checkpoint(checkpoint)
    meta = ckpt.meta
    if meta.get("kind") != RUN_KIND:
        raise RaeError(f"{ckpt.path} is not a train-decoder checkpoint (kind {meta.get('kind')!r})")
    out = Path(out_dir) if out_dir is not None else ckpt.path.parent.parent / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_resolved(TrainDecoderConfig, ckpt.path / run_dir.CONFIG_FILE)
    which = "ema" if use_ema else "decoder"
    decoder = ViTDecoder(**meta["decoder_arch"])
    strict_load(decoder, ckpt.weights(which), f"{ckpt.path}/{which}.safetensors")
    weights = out / "decoder.safetensors"
    save_decoder(decoder, weights, {"source": str(ckpt.path), "step": ckpt.step, "weights": which})
    export_decoder_official(decoder, out / "model.pt")
    rae_cfg = dataclasses.replace(cfg.rae, decoder_weights=str(weights.resolve()), noise_tau=0.0)
    from omegaconf import OmegaConf

    header = (f"# Trained decoder ({which}, step {ckpt.step}) from {ckpt.path.parent.parent.resolve()}: "
              f"`rae recon --preset {(out / 'rae.yaml').resolve()}`\n"
              "# noise_tau is 0 for inference; the encoder is referenced, not copied.\n")
    atomic_write_text(out / "rae.yaml", header + OmegaConf.to_yaml(OmegaConf.create(to_dict(rae_cfg))))
    log.info("exported the %s decoder of %s to %s", which, ckpt.path, out)
    return out

