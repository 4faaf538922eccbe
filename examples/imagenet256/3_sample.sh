#!/usr/bin/env bash
# Step 3: 50,000 class-balanced samples (50 per class, 50-point Euler grid = 49 evaluations, no guidance) from the
# EMA weights of the latest checkpoint; writes PNGs, a grid and samples.npz (arr_0, uint8 N×256×256×3).
source "$(dirname "$0")/env.sh"
rae_launch sample -p "$SAMPLE_PRESET" --out "$SAMPLES" checkpoint="$RUN" num_images=50000 "$@"
