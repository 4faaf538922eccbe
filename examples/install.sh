#!/usr/bin/env bash
# Create .venv (if missing) and install rae with its test, quickstart and diffusers extras. Safe to re-run.
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports on our CPU machines; on a GPU box install your
# own CUDA build of torch first and skip the pin with RAE_SKIP_TORCH_PIN=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "${RAE_SKIP_TORCH_PIN:-0}" != "1" ]; then
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install -q -e ".[test,quickstart,diffusers]"
