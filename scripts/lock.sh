#!/usr/bin/env bash
# Regenerate requirements.lock: the exact versions `scripts/setup.sh` installs.
# Run it deliberately (to move to newer releases), then run the tests and commit the lock with the results:
#   bash scripts/lock.sh && bash scripts/setup.sh && . .venv/bin/activate && python -m pytest -q
# It resolves prunekit's dependencies (pyproject.toml ranges) to their newest releases in a fresh virtual
# environment with the CPU build of torch, and writes `pip freeze` of that environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=$(sed -n 's/^TORCH_VERSION=//p' scripts/setup.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q --no-deps --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install -q "torch==$TORCH" -e ".[test,llamacpp]"
python -m pip check
{
  echo "# Exact versions installed by scripts/setup.sh (as pip constraints). Regenerate with scripts/lock.sh."
  echo "# torch's local label (+cpu) is dropped: the same pin takes the CUDA build on a GPU machine."
  python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
