#!/usr/bin/env bash
# The Prefect UI as a user sees it: start a local Prefect server (with its UI) in a fresh PREFECT_HOME, run a
# two-point sweep of this repository's pipeline through a process work pool with two workers, and take
# screenshots with headless Chromium (Debian: apt-get install chromium) of the deployment, the flow runs and the
# prunekit-metrics / prunekit-report / prunekit-sweep artifacts. The PNGs go to docs/ui/.
#   bash scripts/ui_screenshots.sh [KEY=V1,V2 ...]      (default grid: prune.target=0.2,0.25)
# Runs from the repository root with .venv set up (scripts/setup.sh) and `dvc repro` done once (the sweep points
# reuse its cached stages). The sweep's experiments (ui-0, ui-1) stay in `dvc exp show` (`dvc exp remove ui-0 ui-1`).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "ui_screenshots: no chromium on PATH (Debian: apt-get install chromium)" >&2; exit 2; }
grid=("$@")
[ ${#grid[@]} -gt 0 ] || grid=(prune.target=0.2,0.25)
out=docs/ui
mkdir -p "$out"
work=$(mktemp -d)
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_HOME=$work/prefect PREFECT_API_URL=http://127.0.0.1:$port/api PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_UI_URL=http://127.0.0.1:$port
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2> /dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
setsid prefect server start --host 127.0.0.1 --port "$port" --analytics-off > "$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" > /dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" > /dev/null || { echo "ui_screenshots: the server did not start ($work/server.log)" >&2; exit 1; }

prefect work-pool create prunekit --type process > /dev/null
deployment=$(python flows/pipeline.py deploy --pool prunekit --name prunekit-pool | sed -n 's/.*(\(.*\)) on work pool.*/\1/p')
for w in worker-0 worker-1; do
  setsid prefect worker start --pool prunekit --name "$w" --limit 1 > "$work/$w.log" 2>&1 &
  pids+=($!)
done
args=()
for axis in "${grid[@]}"; do args+=(-G "$axis"); done
dvc exp remove ui-0 ui-1 > /dev/null 2>&1 || true  # a second run of this script replaces its experiments
python flows/pipeline.py sweep "${args[@]}" -G runtime.threads=1 --prefix ui

shoot() {  # name url
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1440,1000 \
    --virtual-time-budget=15000 --screenshot="$out/$1.png" "$2" 2> /dev/null
  echo "$out/$1.png  <- $2"
}
ui=$PREFECT_UI_URL
shoot deployment "$ui/deployments/deployment/$deployment"
shoot flow-runs "$ui/runs"
for key in prunekit-metrics prunekit-report prunekit-sweep; do  # the newest version of each, as it reads
  id=$(python - "$key" <<'PY'
import asyncio, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
async def main():
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[sys.argv[1]])))
        print(max(found, key=lambda a: a.created).id)
asyncio.run(main())
PY
)
  shoot "${key#prunekit-}-artifact" "$ui/artifacts/artifact/$id"
done
