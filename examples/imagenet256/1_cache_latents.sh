#!/usr/bin/env bash
# Step 1: encode ImageNet once (ADM 256 crop + mirror, bf16, ≈1 TB) and compute the exact latent statistics.
# Re-running resumes: finished shards are kept.
source "$(dirname "$0")/env.sh"
rae_launch cache-latents "$IMAGENET" --out "$CACHE" -p dinov2-b_in256 "$@"
