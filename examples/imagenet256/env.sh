#!/usr/bin/env bash
# Shared settings of the ImageNet-256 recipe (sourced by the numbered scripts). Override any of them in the
# environment, e.g.  IMAGENET=/data/imagenet/train NGPU=8 bash examples/imagenet256/run_all.sh
# Recipe (paper / spec §6-7): DINOv2-B latents → DiT-DH-XL, 1400 epochs at batch 1024 → 50k samples → FID-50k.
set -euo pipefail
IMAGENET=${IMAGENET:-data/imagenet/train}            # ImageFolder layout: one sub-folder per class (1000)
REFERENCE=${REFERENCE:-data/imagenet/VIRTUAL_imagenet256_labeled.npz}  # ADM reference batch (mu/sigma)
WORK=${WORK:-runs/imagenet256}                        # everything is written under here
NGPU=${NGPU:-8}                                       # processes (GPUs) on this machine
TRAIN_PRESET=${TRAIN_PRESET:-dit-dh-xl_dinov2-b_in256}
SAMPLE_PRESET=${SAMPLE_PRESET:-dit-dh-xl_in256}
CACHE=${CACHE:-$WORK/cache}
RUN=${RUN:-$WORK/$TRAIN_PRESET}
SAMPLES=${SAMPLES:-$WORK/samples}

# `rae ...` on one process, `torchrun -m rae_cli ...` on several: the same command either way.
rae_launch() {
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NGPU" -m rae_cli "$@"
  else
    rae "$@"
  fi
}
