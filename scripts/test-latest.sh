#!/usr/bin/env bash
# Run the fast tests against the NEWEST releases of the libraries whose changes break pruned models most often
# (transformers, peft, lm-eval), everything else as requirements.lock pins it, in ./.venv-latest.
# CI tests the lock; run this before moving the lock (scripts/lock.sh) or when a new release is out:
#   bash scripts/test-latest.sh            # fast tests (-m "not slow")
#   bash scripts/test-latest.sh -q tests/test_head_dims.py    # or any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
LATEST=(transformers peft lm-eval)
VENV=.venv-latest bash scripts/setup.sh
. .venv-latest/bin/activate
python -m pip install -q --upgrade "${LATEST[@]}"
python -m pip check || echo "note: pip check reports conflicts with the newest releases (above)"
python - <<'PY'
from importlib import metadata
print("testing with " + ", ".join(f"{n} {metadata.version(n)}" for n in ("transformers", "peft", "lm-eval")))
PY
if [ $# -eq 0 ]; then set -- -q -m "not slow"; fi
python -m pytest "$@"
