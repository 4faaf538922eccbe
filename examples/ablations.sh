#!/usr/bin/env bash
# The paper's design choices, tested in miniature on the quickstart digits (CPU, offline).
#
#   bash examples/ablations.sh [OUT_DIR]          (default: ablations-out/)
#
# Runs the quickstart into OUT_DIR/quickstart (or reuses ABLATIONS_QUICKSTART=DIR, a finished quickstart output), then
# one change at a time against it:
#   decoder noise τ 0 vs 0.8 · time shift: the dimension rule vs s = 1, 2, 4 · LightningDiT vs DiT-DH at equal
#   parameters · no guidance / CFG / CFG on an interval / AutoGuidance · DiT width below / at / above the token
#   dimension (rae overfit-probe).
# Every sample set is judged the same way (rae eval-digits, ABLATIONS_SAMPLES images, 50 Euler steps) and
# OUT_DIR/ablations.md gets one table (variant, class accuracy, Fréchet distance, diversity ratio, train time) with the
# paper's figure next to each claim; OUT_DIR/ablations.png plots it. Re-running resumes: every command skips or
# resumes finished work. ABLATIONS_SCALE=ci runs a few steps per stage (the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-ablations-out}
SCALE=${ABLATIONS_SCALE:-full}

if [ "${RAE_SKIP_INSTALL:-0}" != "1" ]; then
  bash examples/install.sh
fi
# shellcheck disable=SC1091
[ -x .venv/bin/rae ] && . .venv/bin/activate

if [ "$SCALE" = "ci" ]; then
  N=20
  DEC=(train.epochs=1 train.global_batch_size=32 data.holdout=4)
  DIT=(epochs=1 global_batch_size=32 ckpt_every_epochs=1)
  GUIDE=(epochs=1 global_batch_size=32 ckpt_every_epochs=1)
  SMP=(num_steps=10)
  PROBE=(--steps 20 eval_samples=64)
else
  N=${ABLATIONS_SAMPLES:-500}
  DEC=()
  DIT=()
  GUIDE=(epochs=10 ckpt_every_epochs=10)   # the AutoGuidance guide: the same DiT trained 10 epochs instead of 60
  SMP=()
  PROBE=()
fi

mkdir -p "$OUT"
QUICK=${ABLATIONS_QUICKSTART:-$OUT/quickstart}   # a finished quickstart output folder is reused as it is
if [ ! -f "$QUICK/metrics.json" ]; then
  RAE_SKIP_INSTALL=1 QUICKSTART_SCALE=$SCALE bash examples/quickstart.sh "$QUICK"
fi
DATA=$QUICK/data
LATENTS=$QUICK/latents
RAE_YAML=$QUICK/decoder/export/rae.yaml

TIMINGS="$OUT/timings.tsv"
touch "$TIMINGS"
stage() {  # stage NAME COMMAND...: run, time, and record (a finished stage re-run is recorded again; the last wins)
  local name=$1; shift
  local t0=$EPOCHREALTIME
  echo "== $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$t0" "$EPOCHREALTIME" >> "$TIMINGS"
}
train_dit() {  # train_dit NAME OVERRIDES...: a quickstart train-dit run with one change
  local name=$1; shift
  stage "train-dit $name" rae train-dit -p quickstart --cache "$LATENTS" --out "$OUT/dit-$name" rae="$RAE_YAML" \
    "${DIT[@]}" "$@"
}
sample() {  # sample NAME RUN OVERRIDES...: N images (class i mod 10) from RUN, judged by eval-digits
  local name=$1 run=$2; shift 2
  stage "sample $name" rae sample -p quickstart --out "$OUT/samples/$name" checkpoint="$run" num_images="$N" \
    batch_size=250 grid_images=100 "${SMP[@]}" "$@"
  local floor=(); [ "$name" = reference ] && floor=(--real-train "$DATA/train")   # the same-count real floor, once
  stage "evaluate $name" rae eval-digits "$OUT/samples/$name" --real "$DATA/test" "${floor[@]}" \
    --out "$OUT/samples/$name/metrics.json" --grid "$OUT/samples/$name/by_class.png"
}

# -- the reference: the quickstart's own decoder (τ = 0.8), DiT (shift 2) and guidance ------------------------------
sample reference "$QUICK/dit"

# -- decoder noise augmentation: the same DiT decoded by a decoder trained without noise (τ = 0) -------------------
stage "train-decoder tau0" rae train-decoder "$DATA/train" --out "$OUT/decoder-tau0" -p quickstart rae.noise_tau=0.0 \
  "${DEC[@]}"
stage "recon tau0.8" rae recon "$DATA/test" --out "$OUT/recon/tau0.8" -p "$RAE_YAML" grid_images=16
stage "recon tau0" rae recon "$DATA/test" --out "$OUT/recon/tau0" -p "$OUT/decoder-tau0/export/rae.yaml" grid_images=16
sample decoder-tau0 "$QUICK/dit" rae="$OUT/decoder-tau0/export/rae.yaml"

# -- time shift: the paper's dimension rule (sqrt(640/4096) ≈ 0.40 here) against fixed s ------------------------------
train_dit shift-rule flow.shift=null
train_dit shift1 flow.shift=1.0
train_dit shift4 flow.shift=4.0
sample shift-rule "$OUT/dit-shift-rule"
sample shift1 "$OUT/dit-shift1"
sample shift4 "$OUT/dit-shift4"

# -- the wide head: DiT-DH (body 192 × 2 + head 256 × 1, 2.95M) against LightningDiT (192 × 4, 2.94M) ------------------
train_dit dh dit=quickstart-dh
sample dh "$OUT/dit-dh"

# -- guidance: none, CFG on the whole path, CFG on an interval, AutoGuidance with an early checkpoint as the guide ---
train_dit guide "${GUIDE[@]}"
sample no-guidance "$QUICK/dit" guidance.method=none
sample cfg-interval "$QUICK/dit" guidance.t_min=0.0 guidance.t_max=0.7
sample autoguidance "$QUICK/dit" guidance.method=autoguidance guidance.scale=2.0 \
  guidance.guide_checkpoint="$OUT/dit-guide"

# -- Theorem 1: width below / at / above the token dimension (a 32-channel latent, patch 1) ----------------------------------
stage "overfit-probe" rae overfit-probe --out "$OUT/probe" "${PROBE[@]}"

python examples/ablations_report.py "$OUT" "$QUICK"
