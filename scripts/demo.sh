#!/usr/bin/env bash
# `make demo`: run examples/hello.py twice on the embedded default (no servers) and show that
# the second run is a script cache hit in a pre-started (warm) sandbox. No image is built.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
unset RGRID_API_URL RGRID_API_KEY RGRID_DATABASE_URL RGRID_S3_ENDPOINT_URL
# A fresh data folder each time, so the first run is always a miss and the second a hit.
export RGRID_DATA_DIR="$REPO/.rgrid-dev/demo"
RGRID="$REPO/.venv/bin/rgrid"
# The last demo's agent (it keeps the pipeline loaded between runs) goes with its folder.
"$RGRID" agent stop >/dev/null 2>&1 || true
rm -rf "$RGRID_DATA_DIR"

echo "== first run: the script is new (a cache miss; nothing is built, a sandbox is started)" >&2
"$RGRID" run examples/hello.py
echo >&2
echo "== second run: same script: a cache hit, in the warm sandbox the first run left" >&2
"$RGRID" run examples/hello.py --json >"$RGRID_DATA_DIR/second.json"
"$REPO/.venv/bin/python" - "$RGRID_DATA_DIR/second.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"second run: {result['status']}, script cache {'hit' if result['script_cache_hit'] else 'MISS'},"
      f" {'warm' if result['sandbox_warm'] else 'cold'} sandbox, {result['duration_s']}s;"
      f" outputs in {result['outputs_dir']}")
sys.exit(0 if result["script_cache_hit"] and result["status"] == "succeeded" else 1)
PY
echo "(a local agent keeps the pipeline loaded for the next run; it stops after 10 idle minutes, or now with: RGRID_DATA_DIR=$RGRID_DATA_DIR $RGRID agent stop)" >&2
