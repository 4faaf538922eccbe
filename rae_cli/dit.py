"""Stage-2 diffusion transformers: LightningDiT and DiT^DH (DiT with a wide, shallow DDT head), spec §3.

Both models take the noisy latent x (B, C, H, W), the flow time t (B,) in [0, 1] (t = 1 is noise) and class labels
y (B,) and return the velocity (B, C, H, W). Parameter names match the official checkpoints (``LightningDiT`` and
``DiTwDDTHead``), so official state dicts load strictly.

MeanFlow (``second_time="interval"`` or ``"r"``): the model also takes the start time r of an interval [r, t] and
returns the *average* velocity over it; the second time (t − r, or r) is embedded like t by ``r_embedder`` (the
MF-RAE key name) and added to the time embedding wherever t_emb is used. Without r (r = t) it is the
instantaneous velocity. ``r_embedder``'s output layer starts at zero, so a flow-matching state dict loaded into a
MeanFlow model (:func:`load_flow_into_meanflow`) gives exactly the flow model, for every (r, t). Also here: the paper-name registry, the width rule of
Theorem 1, and parameter counting.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from torch import nn

# The models and their shared parts live in rae_cli.dit_models and rae_cli.dit_base; their names are re-exported here,
# where they always were (checkpoints and configs name the classes, not the modules).
from rae_cli.dit_base import (  # noqa: F401
    SECOND_TIME, DiTBlock, FinalLayer, _as_pair, _DiTBase, _in_any_interval, _interval_list, _per_sample)
from rae_cli.dit_models import DiTDH, LightningDiT  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Registry, width rule, parameter counts

# name → (class, hidden_size, depth, num_heads); the DiT-DH head is 2 blocks of width 2048 with 16 heads.
DIT_REGISTRY: dict[str, tuple[type[nn.Module], object, object, object]] = {
    "DiT-S": (LightningDiT, 384, 12, 6),
    "DiT-B": (LightningDiT, 768, 12, 12),
    "DiT-L": (LightningDiT, 1024, 24, 16),
    "DiT-XL": (LightningDiT, 1152, 28, 16),
    "DiT-DH-S": (DiTDH, [384, 2048], [12, 2], [6, 16]),
    "DiT-DH-B": (DiTDH, [768, 2048], [12, 2], [12, 16]),
    "DiT-DH-L": (DiTDH, [1024, 2048], [24, 2], [16, 16]),
    "DiT-DH-XL": (DiTDH, [1152, 2048], [28, 2], [16, 16]),
}


def check_width(width: int, latent_channels: int, allow_narrow: bool) -> None:
    """Theorem 1: a transformer of width d < n (n = dimension of one input token) cannot fit the data; for a single
    image the flow-matching loss is bounded below by (n − d)/n. Raise unless ``allow_narrow``; warn loudly if so."""
    if width >= latent_channels:
        return
    bound = (latent_channels - width) / latent_channels
    msg = (f"model width {width} < token dimension {latent_channels}: by Theorem 1 of the RAE paper the diffusion "
           f"loss cannot go below (n − d)/n = {bound:.3f} even on a single image, so training will fail to fit")
    log.warning("!" * 20 + " " + msg + " " + "!" * 20)
    if not allow_narrow:
        raise ValueError(msg + ". Use a wider model (or DiT-DH, whose head is wide), or pass allow_narrow=True "
                         "(config: dit.allow_narrow: true) to build it anyway.")


def build_dit(name: str, *, input_size: int, in_channels: int, num_classes: int, patch_size: int = 1,
              allow_narrow: bool = False, **overrides) -> nn.Module:
    """Build a registry model by its paper name (e.g. ``"DiT-DH-XL"``); ``overrides`` replace constructor kwargs.

    The width rule is checked against the width that reads the token and writes the output: the hidden size for
    DiT, the **head** width for DiT-DH (its encoder may be narrower, e.g. DiT-DH-S [384, 2048] on 768 channels — the
    wide head is the point of the design). The token dimension is in_channels·patch_size².
    """
    if name not in DIT_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DIT_REGISTRY)}")
    cls, hidden, depth, heads = DIT_REGISTRY[name]
    kwargs = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
                  hidden_size=hidden, depth=depth, num_heads=heads)
    kwargs.update(overrides)
    hidden = kwargs["hidden_size"]
    width = _as_pair(hidden, "hidden_size")[1] if cls is DiTDH else hidden
    if not isinstance(width, int):
        raise ValueError(f"{name} needs an integer hidden_size, got {hidden!r}")
    check_width(width, in_channels * patch_size**2, allow_narrow)
    return cls(**kwargs)


def load_flow_into_meanflow(model: nn.Module, state_dict: dict, what: str = "weights") -> list[str]:
    """Load a state dict into ``model``; a flow-matching state dict may lack the MeanFlow ``r_embedder.*`` keys.

    The rule: every key of the state dict must exist in the model with the same shape, and the only keys the model
    may have beyond it are ``r_embedder.*``, which keep their initial values — a zero output layer, so the loaded
    model computes exactly the flow model's velocity, whatever r is. Returns the keys left at their init.
    """
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith("r_embedder."))
    if unexpected or missing:
        raise ValueError(f"{what} do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    kept = sorted(set(own) - set(state_dict))
    model.load_state_dict(state_dict, strict=False)
    return kept


class ParamCount(NamedTuple):
    total: int
    trainable: int


def count_parameters(model: nn.Module) -> ParamCount:
    """Total parameters (including frozen pos-embed and ``t_embedder.W``; buffers excluded) and trainable ones."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCount(total, trainable)
