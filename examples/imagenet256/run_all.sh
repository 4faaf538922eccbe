#!/usr/bin/env bash
# The whole ImageNet-256 recipe, step by step; each step can be re-run on its own and resumes where it stopped.
here="$(dirname "$0")"
bash "$here/1_cache_latents.sh"
bash "$here/2_train_dit.sh"
bash "$here/3_sample.sh"
bash "$here/4_eval_fid.sh"
