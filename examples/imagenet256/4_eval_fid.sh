#!/usr/bin/env bash
# Step 4: FID-50k (and IS, precision/recall) of the samples against the ADM ImageNet-256 reference batch.
source "$(dirname "$0")/env.sh"
rae eval-fid "$SAMPLES/samples.npz" "$REFERENCE" --out "$WORK/fid.json" "$@"
