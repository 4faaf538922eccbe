"""The feature networks of :mod:`rae_cli.fid`: the ``FeatureExtractor`` protocol, torch-fidelity's Inception
('inception-v3-compat'), EfficientNet-Lite0 and a seeded random-conv test double, and ``get_extractor`` by name."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rae_cli import npz
from rae_cli.checkpoint import CheckpointError, torch_load_weights
from rae_cli.errors import DataError
from rae_cli.weights import WeightsNotFoundError, get_artifact, resolve

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = get_artifact("fid-inception").hub_filename  # weights-inception-2015-12-05-6726825d.pth


# ------------------------------------------------------------------------------------------ feature extractors


class FeatureExtractor(Protocol):
    """Maps uint8 (B, H, W, 3) images to ``{"pool": (B, D) float32, "logits": (B, K) float32 or None}`` on the CPU.

    ``name`` identifies the network and its weights; it is part of the reference-statistics cache key.
    """

    name: str

    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]: ...


def _to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy → uint8 (B, 3, H, W) tensor on ``device``."""
    npz.check_images_array(images, "feature extractor input")
    if not images.flags.writeable:  # arrays streamed from an npz are read-only views; torch wants to own them
        images = images.copy()
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2)


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights_path`` if given, else artifact 'fid-inception' (torch hub checkpoints).

    Raises WeightsNotFoundError naming the file, where it goes and ``rae download fid-inception``.
    """
    if weights_path is None:
        return resolve("fid-inception")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"FID Inception weights not found at {path} (the path you gave). The file is {INCEPTION_WEIGHTS_FILE}; "
            "`rae download fid-inception` puts it in the torch hub checkpoints folder, where it is found by default.")
    return path


class InceptionFeatureExtractor:
    """torch-fidelity's FeatureExtractorInceptionV3 ('inception-v3-compat'): 2048-d pool + 1008 unbiased logits.

    It resizes to 299 itself (TF1-compatible bilinear) and wants uint8 input. We never let it download: the
    weights are read from disk with ``weights_only=True`` and handed over as an in-memory copy, because
    torch-fidelity would otherwise unpickle the file with ``weights_only=False``.
    """

    name = INCEPTION_NAME

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        path = inception_weights_path(weights_path)  # fail fast, before the slow torch-fidelity import
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        state_dict = torch_load_weights(path)  # plain tensors only, or CheckpointError
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)  # re-serialised from tensors we just loaded safely
        buffer.seek(0)
        try:
            model = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=buffer)
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatches
            raise CheckpointError(f"{path} is not the torch-fidelity Inception state dict: {e}") from e
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        pool, logits = self.model(_to_nchw(images, self.device))  # (B, 2048), (B, 1008)
        return {"pool": pool.float().cpu(), "logits": logits.float().cpu()}


class RandomConvFeatureExtractor(nn.Module):
    """TEST DOUBLE — a tiny randomly initialised CNN, for running the FID pipeline without Inception weights.

    Its numbers mean nothing beyond "same vs different distributions"; it is never used by default. Seeded, so
    two instances with the same arguments give identical features (and share a statistics cache entry).
    """

    def __init__(self, seed: int = 0, dim: int = 16, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.name = f"random-conv-test-double(seed={seed},dim={dim},classes={num_classes},size={image_size})"
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(dim, num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # He init (weights), zero biases: activations neither vanish nor explode
                if p.dim() == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
        self.eval()

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        x = _to_nchw(images, torch.device("cpu")).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        pool = self.body(x).mean(dim=(2, 3))  # (B, dim)
        return {"pool": pool, "logits": self.head(pool)}  # logits (B, num_classes)


class EfficientNetLite0FeatureExtractor(nn.Module):
    """Pretrained ImageNet EfficientNet-Lite0 (weights ship with a pip package, so it works offline).

    Not Inception: its Fréchet distance is **not FID** and is not comparable with published numbers. It is a real,
    pretrained feature space for small offline checks (the quickstart): images are resized (bilinear, antialias) to
    ``image_size``, ImageNet-normalised, and the 1280-d globally pooled pre-logit features and the 1000 logits are
    returned.
    """

    def __init__(self, image_size: int = 128, device: str | torch.device = "cpu"):
        super().__init__()
        from rae_cli.encoders import IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite0_classifier

        self.name = f"efficientnet-lite0-imagenet(size={image_size})"
        self.image_size = image_size
        self.device = torch.device(device)
        self.model = efficientnet_lite0_classifier().to(self.device).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(self.device))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(self.device))

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, torch.Tensor | None]:
        x = _to_nchw(images, self.device).float() / 255.0  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        feats = self.model.forward_head(self.model.forward_features((x - self.mean) / self.std), pre_logits=True)
        return {"pool": feats.float().cpu(), "logits": self.model.get_classifier()(feats).float().cpu()}


FEATURE_EXTRACTORS = ("inception", "efficientnet-lite0")


def get_extractor(name: str = "inception", *, device: str | torch.device = "cpu",
                  inception_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """A pretrained feature network by name: ``inception`` (FID proper) or ``efficientnet-lite0`` (offline; its
    Fréchet distance is not FID). The random test double is chosen in :mod:`rae_cli.evaluate`, never here."""
    if name == "inception":
        return InceptionFeatureExtractor(weights_path=inception_weights, device=device)
    if name == "efficientnet-lite0":
        return EfficientNetLite0FeatureExtractor(device=device)
    raise DataError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")
