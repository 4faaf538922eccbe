#!/usr/bin/env bash
# The test command (README, CI): install what the suite needs into .venv, run pytest; then the transformers-floor
# step: the encoder and diffusers tests again under transformers 4.56 (the floor in pyproject.toml).
#
# The floor venv (.venv-floor) holds only transformers 4.56 (+ its huggingface_hub) and diffusers 0.39 (the
# newest AutoencoderRAE release whose hub pin fits transformers 4.x); everything else, torch included, is reused
# from .venv through a .pth file. RAE_SKIP_FLOOR=1 skips that step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
status=0
python -m pytest -q "$@" || status=$?   # the floor step still runs; the exit status reports both

if [ "${RAE_SKIP_FLOOR:-0}" != "1" ]; then
  if [ ! -x .venv-floor/bin/python ]; then
    python -m venv .venv-floor
  fi
  site=$(.venv-floor/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # the repository, then every site-packages folder .venv sees (its own and any it chains to)
  { pwd; python -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('site-packages')))"; } \
    > "$site/_rae_venv.pth"
  .venv-floor/bin/python -m pip install -q "transformers==4.56.*" "diffusers==0.39.*"
  echo "transformers floor: $(.venv-floor/bin/python -c 'import transformers; print(transformers.__version__)')"
  .venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_encoders.py tests/test_diffusers_rae.py \
    || status=$?
fi
exit $status
