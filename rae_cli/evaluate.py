"""``rae eval-fid`` and rFID: the one evaluation path over :mod:`rae_cli.fid` (spec §7).

FID / Inception Score / precision-recall of generated images (folder or ``.npz``) against a reference (folder,
``.npz`` of images, or an ADM reference batch with precomputed ``mu``/``sigma``), with torch-fidelity's Inception
('inception-v3-compat', weights from a local file or the torch hub cache, never downloaded here). Reference
statistics are cached. The random-CNN test double exists only for tests: it is chosen by the environment variable
``RAE_TEST_FEATURE_EXTRACTOR=random`` (or a hidden CLI flag), warns loudly, and marks every result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, List, Optional

from rae_cli.config import ConfigError, doc

FEATURE_EXTRACTORS = ("inception", "efficientnet-lite0")  # the pretrained ones (rae_cli.fid.get_extractor)

log = logging.getLogger(__name__)

TEST_DOUBLE_ENV = "RAE_TEST_FEATURE_EXTRACTOR"
TEST_DOUBLE_NAMES = ("random", "random-test-double")
TEST_DOUBLE_WARNING = "TEST DOUBLE, not FID: features come from a random CNN; these numbers mean nothing"


@dataclass
class EvalFIDConfig:
    """``rae eval-fid``: FID, Inception Score and precision/recall of generated images against a reference."""

    preset_kind: ClassVar[str] = "eval-fid"

    generated: Optional[str] = doc("Generated images: a folder (recursive) or an .npz with arr_0 uint8 (N, H, W, 3).",
                                   None)
    reference: Optional[str] = doc("Reference: a folder, an .npz of images, or an ADM reference batch (mu/sigma, "
                                   "e.g. VIRTUAL_imagenet256_labeled.npz). Needed for fid and pr.", None)
    metrics: List[str] = doc("Any of fid, is (Inception Score), pr (precision/recall).",
                             factory=lambda: ["fid", "is", "pr"])
    inception_weights: Optional[str] = doc("Path of torch-fidelity's weights-inception-2015-12-05-6726825d.pth; "
                                           "null = the torch hub cache (`rae download fid-inception`).", None)
    features: str = doc("Feature network: inception (FID proper) or efficientnet-lite0 (pretrained, offline; its "
                        "Fréchet distance is NOT FID and not comparable with published numbers).", "inception")
    batch_size: int = doc("Images per Inception forward pass.", 50)
    cache: bool = doc("Cache reference statistics (keyed by path, size, mtime and network).", True)
    cache_dir: Optional[str] = doc("Statistics cache folder; null = the default (fid-stats/ under $RAE_HOME, "
                                   "~/.cache/rae).", None)
    pr_k: int = doc("k of the k-NN manifolds for precision/recall (Kynkäänniemi et al.: 3).", 3)
    is_splits: int = doc("Inception Score splits (standard: 10).", 10)
    device: str = doc("auto, cpu or cuda.", "auto")

    def validate(self) -> None:
        from rae_cli.fid import METRICS

        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ConfigError(f"metrics must be a non-empty list of {', '.join(METRICS)}; got {self.metrics}")
        if self.features not in FEATURE_EXTRACTORS:
            raise ConfigError(f"features must be one of {', '.join(FEATURE_EXTRACTORS)}, not {self.features!r}")
        if self.batch_size < 1 or self.pr_k < 1 or self.is_splits < 1:
            raise ConfigError("batch_size, pr_k and is_splits must be ≥ 1")


def wants_test_double(flag: str | None = None) -> bool:
    """True when the random test-double extractor is asked for (hidden flag value or ``$RAE_TEST_FEATURE_EXTRACTOR``)."""
    value = flag or os.environ.get(TEST_DOUBLE_ENV, "")
    if not value:
        return False
    if value in ("inception", "inception-v3-compat"):
        return False
    if value not in TEST_DOUBLE_NAMES:
        raise ConfigError(f"unknown feature extractor {value!r} (from --feature-extractor or ${TEST_DOUBLE_ENV}); "
                          f"use inception or {TEST_DOUBLE_NAMES[-1]}")
    return True


def make_extractor(inception_weights: str | None = None, device: str = "cpu", test_double: bool | None = None,
                   features: str = "inception"):
    """The feature network: torch-fidelity's Inception (or another pretrained one by name), or (tests only) the
    random CNN with a loud warning."""
    from rae_cli import fid

    if test_double is None:
        test_double = wants_test_double()
    if test_double:
        log.warning("!" * 12 + " " + TEST_DOUBLE_WARNING + " " + "!" * 12)
        return fid.RandomConvFeatureExtractor()
    return fid.get_extractor(features, device=device, inception_weights=inception_weights)


def is_test_double(extractor) -> bool:
    from rae_cli.fid import RandomConvFeatureExtractor

    return isinstance(extractor, RandomConvFeatureExtractor)


def _mark(result: dict, extractor) -> dict:
    if is_test_double(extractor):
        result = {"WARNING": TEST_DOUBLE_WARNING, "test_double": True, **result}
    else:
        result = {"test_double": False, **result}
    return result


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate_fid(cfg: EvalFIDConfig, out: str | Path | None = None, *, test_double: bool | None = None) -> dict:
    """Run the metrics of ``cfg``; write the result JSON to ``out`` (if given) and return it.

    The JSON holds the metric values, image counts, the feature network's name, the inputs and the time taken;
    with the test double also ``"test_double": true`` and a warning.
    """
    from rae_cli import fid
    from rae_cli.checkpoint import atomic_write_json
    from rae_cli.errors import DataError

    if not cfg.generated:
        raise ConfigError("eval-fid needs the generated images: rae eval-fid GENERATED [REFERENCE]")
    for what, p in (("generated images", cfg.generated), ("reference", cfg.reference)):
        if p is not None and not Path(p).exists():
            raise DataError(f"{what} not found: {p}")
    if cfg.reference is None and any(m in cfg.metrics for m in ("fid", "pr")):
        raise ConfigError("fid and pr need a reference (folder, .npz or ADM reference batch); "
                          "or ask only for metrics=[is]")
    device = _device(cfg.device)
    extractor = make_extractor(cfg.inception_weights, device, test_double, cfg.features)
    cache_dir = (cfg.cache_dir or fid.default_cache_dir()) if cfg.cache else None
    start = time.perf_counter()
    try:
        result = fid.evaluate(cfg.generated, cfg.reference, extractor=extractor, batch_size=cfg.batch_size,
                              cache_dir=cache_dir, metrics=tuple(cfg.metrics), pr_k=cfg.pr_k,
                              is_splits=cfg.is_splits, device=device)
    except ValueError as e:  # too few images, mismatched feature sizes, ...: the user's inputs, said plainly
        raise DataError(str(e)) from e
    result.update(generated=str(cfg.generated), reference=cfg.reference, seconds=time.perf_counter() - start)
    result = _mark(result, extractor)
    if cfg.features != "inception" and not result.get("test_double"):
        result = {"NOTE": f"Fréchet distance in {cfg.features} features: not FID", **result}
    if out is not None:
        atomic_write_json(out, result)
    return result


def rfid(recon_uint8, ref_uint8, extractor=None, *, batch_size: int = 50, device: str = "auto") -> float:
    """rFID: FID of reconstructions against their inputs, both uint8 (N, H, W, 3) arrays (the stage-1 metric).

    ``extractor`` defaults to the Inception network (or the test double when ``$RAE_TEST_FEATURE_EXTRACTOR``
    asks for it). Same code as ``rae eval-fid``.
    """
    from rae_cli import fid

    device = _device(device)
    if extractor is None:
        extractor = make_extractor(device=device)
    res = fid.evaluate(recon_uint8, ref_uint8, extractor=extractor, batch_size=batch_size, metrics=("fid",),
                       device=device)
    return float(res["fid"])


def summary_line(result: dict) -> str:
    """One human-readable line: the metrics that were computed."""
    parts = []
    if result.get("fid") is not None:
        parts.append(f"FID {result['fid']:.4f}")
    if result.get("inception_score_mean") is not None:
        parts.append(f"IS {result['inception_score_mean']:.3f} ± {result['inception_score_std']:.3f}")
    if result.get("precision") is not None:
        parts.append(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}")
    parts.append(f"({result['num_generated']} generated"
                 + (f" vs {result['num_reference']} reference" if result.get("num_reference") else "") + ")")
    line = "  ".join(parts)
    return f"[{TEST_DOUBLE_WARNING}] " + line if result.get("test_double") else line
