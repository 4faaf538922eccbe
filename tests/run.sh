#!/usr/bin/env bash
# The test command (README, CI): install what the suite needs into .venv, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q "$@"
