"""LPIPS-VGG perceptual distance for stage-1 training (spec §2.4).

The ``lpips`` package supplies the network; we load its VGG16 trunk from a local file ourselves so nothing is
ever downloaded, and freeze everything. Inputs are images in [−1, 1].
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from rae_cli.checkpoint import strict_load, torch_load_weights
from rae_cli.weights import resolve, resolve_path

log = logging.getLogger(__name__)

# lpips' own VGG slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision `features` indices).
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)


def resolve_vgg16_weights(vgg_weights: str | Path | None) -> Path:
    """The torchvision VGG16 ImageNet file (``vgg16-397923af.pth``): ``vgg_weights`` if given, else the
    ``vgg16`` artifact (torch hub checkpoints folder). Never downloads; raises ``WeightsNotFoundError``."""
    return resolve_path("vgg16", vgg_weights, "LPIPS VGG16 weights")


def vgg16_features_to_lpips(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ``features.{i}.*`` keys to lpips' ``slice{s}.{i}.*``; the classifier keys are dropped."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("features."):
            continue  # classifier.* is not part of LPIPS
        index = int(key.split(".")[1])
        slice_no = next(s for s, end in enumerate(_VGG_SLICE_ENDS, start=1) if index < end)
        out[f"slice{slice_no}.{key[len('features.'):]}"] = value
    return out


class LPIPS(nn.Module):
    """Frozen LPIPS distance: VGG16 features → unit-normalised → squared difference → 1×1 "lin" → spatial mean,
    summed over the 5 layers (spec §2.4). Always in eval mode (the lin dropout never fires).

    ``forward(x, y)`` is the training loss (batch mean); ``distance(x, y)`` gives one value per image.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net  # an lpips.LPIPS(net="vgg")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # A parent's .train() must not switch on the dropout in front of the lin layers.
        return super().train(False)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS, shape (B,), for images (B, 3, H, W) in [−1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images of the same shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        return self.net(x, y).flatten()  # (B, 1, 1, 1) → (B,)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y).mean()


def lpips_network(device: str = "cpu"):
    """The ``lpips.LPIPS(net="vgg")`` module with uninitialised weights on ``device`` (nothing read; "meta": shapes
    only, for the memory planner). :func:`build_lpips` fills every parameter."""
    import lpips
    from lpips.lpips import ScalingLayer

    # Built on the meta device: torchvision's VGG16 constructor would otherwise allocate and initialise its
    # 120M-parameter classifier, which LPIPS drops. pnet_rand=True means torchvision never tries to download.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        net = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    net = net.to_empty(device=device)
    with torch.device(device):
        net.scaling_layer = ScalingLayer()  # its constant buffers were wiped by to_empty; rebuild them
    return net


def build_lpips(vgg_weights: str | Path | None = None, random_init: bool = False) -> LPIPS:
    """LPIPS-VGG with the package's v0.1 lin weights and the torchvision VGG16 ImageNet trunk.

    ``vgg_weights``: a torchvision ``vgg16-397923af.pth`` state dict; default: the ``vgg16`` artifact.
    ``random_init``: TEST ONLY, a random VGG trunk (no file needed); the lin weights are still the real ones.
    Raises ``WeightsNotFoundError`` when the VGG file is missing; nothing is downloaded.
    """
    vgg_path = None if random_init else resolve_vgg16_weights(vgg_weights)
    net = lpips_network()

    # The package loads its lin weights with strict=False; we load them strictly ourselves.
    lin_sd = torch_load_weights(resolve("lpips-vgg-lin"))
    lin_sd = {k.replace("lin", "", 1): v for k, v in lin_sd.items()}  # lin{k}.model.1.weight → {k}.model.1.weight
    strict_load(net.lins, lin_sd, "LPIPS lin weights")

    if random_init:
        for module in net.net.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        log.warning("LPIPS built with a RANDOM VGG16 trunk: a test double, not the perceptual loss.")
    else:
        sd = vgg16_features_to_lpips(torch_load_weights(vgg_path))
        strict_load(net.net, sd, f"VGG16 weights {vgg_path}")
        log.info("LPIPS: VGG16 trunk from %s", vgg_path)
    return LPIPS(net)
