"""The switches users only flip on GPUs, run on the CPU for both trainers: torch.compile (inductor), bf16 and fp16
autocast (fp16 with its GradScaler(s), saved and restored on resume) and activation checkpointing inside the GAN loop.

Each variant trains 2 steps of the tiny presets and is compared with the fp32 eager run from the same seed.
TEST DOUBLES (train-decoder): random-init encoder, discriminator backbone and LPIPS VGG16 trunk; nothing here is a
real loss. The inductor compiles are the slow part (C++ on the CPU; cached in the inductor cache across runs).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import image_folder, synthetic_cache
from rae_cli.config import resolve
from rae_cli.train_decoder import TrainDecoderConfig, train_decoder
from rae_cli.train_dit import TrainDiTConfig, train_dit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy machine
    yield
    torch.set_num_threads(threads)


def metric(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def resume_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "resume.pt", weights_only=True)


def assert_close_files(a: Path, b: Path, names, *, exact: bool = False, rtol=1e-4, atol=1e-6) -> None:
    for name in names:
        ta, tb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            if exact:
                assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs"
            else:
                torch.testing.assert_close(ta[k], tb[k], rtol=rtol, atol=atol, msg=f"{name}:{k}")


def assert_moved(a: Path, b: Path, name: str) -> None:
    """The two runs' ``name`` weights differ somewhere (so a comparison at this tolerance can fail)."""
    ta, tb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
    assert any(not torch.equal(ta[k], tb[k]) for k in ta), f"{name}: the two precisions gave identical weights"


def assert_close_grads(got: list, ref: list, rtol: float = 1e-3) -> None:
    """Every optimizer step's gradients match (both optimizers, in order), up to ``rtol`` of the step's largest
    gradient: a parameter whose true gradient is 0 (an attention key bias, a conv bias right before a norm) gets
    rounding noise, which two correct kernels need not round alike."""
    assert len(got) == len(ref) and ref
    for i, (a, b) in enumerate(zip(got, ref)):
        assert len(a) == len(b)
        scale = max(float(y.abs().max()) for y in b)
        for j, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f"optimizer step {i}, parameter {j}: {m}")


@contextlib.contextmanager
def recording_grads(into: list):
    """Append the gradients every optimizer step is about to apply (after the GradScaler has unscaled them)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def hook(optimizer, args, kwargs):
        into.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield into
    finally:
        handle.remove()


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------------------------------------------
# train-dit


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """The fp32 eager reference: 2 steps of the tiny preset."""
    root = tmp_path_factory.mktemp("dit")
    cache = synthetic_cache(root / "cache")

    def run(name: str, *overrides: str) -> Path:
        cfg = resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", "max_steps=2", *overrides])
        return train_dit(cfg=cfg, out_dir=root / name)

    return dict(root=root, run=run, ref=run("fp32"))


def test_dit_compile_matches_eager(dit):
    before = dynamo_graphs()
    ckpt = dit["run"]("compiled", "compile=true")
    assert dynamo_graphs() > before  # the model really went through dynamo + inductor
    assert metric(dit["root"] / "compiled", "loss") == pytest.approx(metric(dit["root"] / "fp32", "loss"), rel=1e-4)
    assert_close_files(dit["ref"], ckpt, ("model", "ema"))


def test_dit_fp16_scales_and_resumes_identically(dit):
    root = dit["root"]
    ckpt = dit["run"]("fp16", "precision=fp16")
    fp16, fp32 = metric(root / "fp16", "loss"), metric(root / "fp32", "loss")
    assert len(fp16) == 2 and all(math.isfinite(x) for x in fp16)
    assert fp16 == pytest.approx(fp32, rel=0.05)  # same draws, fp16 matmuls
    assert fp16 != fp32  # autocast was on
    assert_moved(dit["ref"], ckpt, "model")
    # The GradScaler is live (a disabled one saves an empty state) and counted both steps without an overflow.
    scaler = resume_state(ckpt)["scaler"]
    assert resume_state(dit["ref"])["scaler"] == {}
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 2
    # Stop after step 1, then re-run the same command: the resumed run restores the scaler and ends identically.
    dit["run"]("fp16-resumed", "precision=fp16", "max_steps=1")
    resumed = dit["run"]("fp16-resumed", "precision=fp16")
    assert_close_files(ckpt, resumed, ("model", "ema"), exact=True)
    assert resume_state(resumed)["scaler"] == scaler  # a fresh scaler would have counted 1 step, not 2
    assert metric(root / "fp16-resumed", "loss") == fp16


# ----------------------------------------------------------------------------------------------------------------
# train-decoder (every loss on: L1, LPIPS, GAN with the adaptive weight, and the discriminator's step)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """The fp32 eager reference: 2 steps of 2 micro-batches (8 images, 2 held out, global batch 4)."""
    import rae_cli.perceptual as perceptual

    root = tmp_path_factory.mktemp("decoder")
    images = image_folder(root / "images", per_class=4)
    built, grads = {}, {}
    real_build = perceptual.build_lpips

    def cached_build_lpips(vgg_weights=None, random_init=False):
        # The frozen random-init LPIPS is the same module in every run (building VGG16 takes seconds).
        if (vgg_weights, random_init) not in built:
            built[(vgg_weights, random_init)] = real_build(vgg_weights, random_init=random_init)
        return built[(vgg_weights, random_init)]

    def run(name: str, *overrides: str) -> Path:
        cfg = resolve(TrainDecoderConfig, preset="tiny",
                      overrides=[f"data.path={images}", "loss.lpips_random_init=true", *overrides])
        with pytest.MonkeyPatch.context() as mp, recording_grads(grads.setdefault(name, [])):
            mp.setattr(perceptual, "build_lpips", cached_build_lpips)
            result = train_decoder(cfg=cfg, out_dir=root / name)
        assert result.step == int(cfg.train.stop_after or 2)
        return root / name / "checkpoints" / f"step-{result.step:09d}"

    return dict(root=root, run=run, ref=run("fp32"), grads=grads)


DECODER_LOSSES = ("l1", "lpips", "gan_g", "d_weight", "d_loss", "loss")


def test_decoder_compile_matches_eager(decoder):
    before = dynamo_graphs()
    ckpt = decoder["run"]("compiled", "train.compile=true")
    assert dynamo_graphs() > before
    for key in (*DECODER_LOSSES, "logits_real", "logits_fake", "eval_psnr"):  # step 2's D terms use D after step 1
        assert metric(decoder["root"] / "compiled", key) == pytest.approx(
            metric(decoder["root"] / "fp32", key), rel=1e-4, abs=1e-6), key
    assert_close_grads(decoder["grads"]["compiled"], decoder["grads"]["fp32"])
    assert_close_files(decoder["ref"], ckpt, ("decoder", "ema"))
    # Not the discriminator's weights: its heads' conv biases sit right before a per-sample norm that cancels them,
    # so their true gradient is 0 and AdamW moves them by ±lr on the sign of rounding noise, which compiled and
    # eager kernels round differently. Their gradients (compared above, relative to the largest) are both ~0.


def test_decoder_grad_checkpointing_in_the_gan_loop_changes_nothing(decoder, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ckpt = decoder["run"]("checkpointed", "train.grad_checkpointing=true")
    assert len(calls) == 2 * 2 * 2  # steps × micro-batches × decoder layers: it was on in the generator step
    for key in DECODER_LOSSES:
        assert metric(decoder["root"] / "checkpointed", key) == pytest.approx(
            metric(decoder["root"] / "fp32", key), rel=1e-6, abs=1e-9), key
    assert_close_grads(decoder["grads"]["checkpointed"], decoder["grads"]["fp32"], rtol=1e-5)
    assert_close_files(decoder["ref"], ckpt, ("decoder", "ema", "disc"), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_decoder_half_precision_is_finite_and_close_to_fp32(decoder, precision):
    root = decoder["root"]
    ckpt = decoder["run"](precision, f"train.precision={precision}")
    for key in DECODER_LOSSES:
        got, want = metric(root / precision, key), metric(root / "fp32", key)
        assert len(got) == 2 and all(math.isfinite(x) for x in got), key
        assert got == pytest.approx(want, rel=0.1, abs=0.02), key
    assert metric(root / precision, "l1") != metric(root / "fp32", "l1")  # autocast was on
    assert_moved(decoder["ref"], ckpt, "decoder")
    state, ref = resume_state(ckpt), resume_state(decoder["ref"])
    assert ref["scaler_g"] == ref["scaler_d"] == {}
    if precision == "bf16":
        assert state["scaler_g"] == state["scaler_d"] == {}  # bf16 needs no loss scaling
    else:  # one live scaler per optimizer, each counting its own optimizer's 2 steps
        assert state["scaler_g"]["scale"] == state["scaler_d"]["scale"] == 2.0 ** 16
        assert state["scaler_g"]["_growth_tracker"] == state["scaler_d"]["_growth_tracker"] == 2


def test_decoder_fp16_resume_restores_both_scalers(decoder):
    root = decoder["root"]
    full = root / "fp16" / "checkpoints" / "step-000000002"
    if not full.is_dir():  # run alone (-k): make the uninterrupted run here
        full = decoder["run"]("fp16", "train.precision=fp16")
    decoder["run"]("fp16-resumed", "train.precision=fp16", "train.stop_after=1")
    resumed = decoder["run"]("fp16-resumed", "train.precision=fp16")
    assert_close_files(full, resumed, ("decoder", "ema", "disc"), exact=True)
    a, b = resume_state(full), resume_state(resumed)
    assert (b["scaler_g"], b["scaler_d"]) == (a["scaler_g"], a["scaler_d"])  # fresh scalers would count 1 step
    for key in DECODER_LOSSES:
        assert metric(root / "fp16-resumed", key) == metric(root / "fp16", key), key
