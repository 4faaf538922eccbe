#!/usr/bin/env bash
# Step 0: fetch the frozen DINOv2-B encoder, the released ViT-XL decoder and stats (used by `rae sample`), and the
# FID Inception weights, into their documented locations (needs a network; `rae download --list` shows them).
source "$(dirname "$0")/env.sh"
for name in dinov2-b decoder-dinov2-b stats-dinov2-b fid-inception; do
  rae download "$name"
done
