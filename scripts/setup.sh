#!/usr/bin/env bash
# Set up prunekit in ./.venv: torch (the CPU build when no NVIDIA GPU is visible), then prunekit with the exact
# versions of requirements.lock (pip constraints; regenerate it with scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  # PyPI's default torch wheel pulls several GB of CUDA libraries; the CPU index has a small build.
  # Only torch itself comes from there (--no-deps): its dependencies resolve from the usual index below.
  python -m pip install -q --no-deps --retries 2 --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
fi
# llama-cpp-python compiles llama.cpp from its source distribution: about 10 minutes on 2 cores the first time
# (pip caches the wheel, so later setups on the machine take seconds); its multimodal library is not needed.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install -q -c requirements.lock "torch==$TORCH_VERSION" -e ".[test,llamacpp]"
python -m pip check
python -c "import prunekit, torch; print(f'prunekit {prunekit.__version__} with torch {torch.__version__} ready in $VENV')"
