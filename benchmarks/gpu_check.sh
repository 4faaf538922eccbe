#!/usr/bin/env bash
# For whoever has an NVIDIA GPU: one table of training/sampling/decoder speed, MFU and peak memory next to the
# memory planner's estimates, and a compile-vs-eager correctness check. Under 8 minutes on one H100/H200.
# Without CUDA it says so and exits 0.   Usage: bash benchmarks/gpu_check.sh [--train-batch N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
