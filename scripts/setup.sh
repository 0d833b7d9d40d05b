#!/usr/bin/env bash
# Set up prunekit in ./.venv: torch (the CPU build when no NVIDIA GPU is visible), then prunekit and its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  # PyPI's default torch wheel pulls several GB of CUDA libraries; the CPU index has a small build.
  # Only torch itself comes from there (--no-deps): its dependencies resolve from the usual index below.
  python -m pip install -q --no-deps --retries 2 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
fi
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -c "import prunekit, torch; print(f'prunekit {prunekit.__version__} with torch {torch.__version__} ready in .venv')"
