#!/usr/bin/env bash
# Step 2: train DiT-DH-XL on the cache (global batch 1024 on any number of GPUs: 1 GPU needs grad_accum_steps=8).
# Re-running the same command resumes from the latest checkpoint in $RUN/checkpoints.
source "$(dirname "$0")/env.sh"
extra=()
if [ "$NGPU" -lt 8 ]; then extra+=("grad_accum_steps=$((8 / NGPU))"); fi
rae_launch train-dit -p "$TRAIN_PRESET" --cache "$CACHE" --out "$RUN" "${extra[@]}" "$@"
