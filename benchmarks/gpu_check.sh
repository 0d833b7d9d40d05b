#!/usr/bin/env bash
# The CUDA checks of benchmarks/gpu_check.py, on a machine with an NVIDIA GPU and no network; prints one table.
#   bash benchmarks/gpu_check.sh [--model DIR] [--shape smollm2-135m|qwen2.5-0.5b]
# Wheels put in ./.whl beforehand (bitsandbytes; transformers / peft where the machine's are older than
# pyproject.toml's ranges) are installed into a private folder first; prunekit itself runs from src/.
# Nothing here is needed by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
