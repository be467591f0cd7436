#!/usr/bin/env bash
# Start the RGrid stack on loopback as background processes: the API under gunicorn, a Celery
# worker, beat and Flower. Prints `export` lines for a development account on stdout, so that
# `eval "$(make -s up)"` points the CLI at the stack; everything else goes to stderr.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
set -a
# shellcheck source=dev.env
. scripts/dev.env
set +a
RUN="$REPO/.rgrid-dev/run"
mkdir -p "$RUN"
BIN="$REPO/.venv/bin"

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {
    local name=$1; shift
    if alive "$name"; then
        echo "$name: already running" >&2
        return
    fi
    # setsid: its own process group, so `make down` stops it and all its children.
    setsid nohup "$@" </dev/null >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
    echo "$name: started (log $RUN/$name.log)" >&2
}

"$BIN/alembic" upgrade head >&2 2>/dev/null || "$BIN/alembic" upgrade head >&2
start api "$BIN/gunicorn" --bind "127.0.0.1:$RGRID_API_PORT" --workers 2 --threads 4 \
    --access-logfile - "rgrid.api:create_app()"
# Supervised as systemd would (Restart=always): a worker that exits, for whatever reason (a
# broker restart has killed celery 5.7's main process here), is started again after a second.
start worker "$REPO/scripts/supervise.sh" "$BIN/celery" -A workers.celery_app worker \
    --loglevel INFO --concurrency 2 --hostname "rgrid-worker-$$@%h"
start beat "$BIN/celery" -A workers.celery_app beat --loglevel INFO \
    --schedule "$RUN/beat-schedule"
start flower "$BIN/celery" -A workers.celery_app flower --address=127.0.0.1 \
    --port="$RGRID_FLOWER_PORT"

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$RGRID_API_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS "http://127.0.0.1:$RGRID_API_PORT/healthz" >/dev/null \
    || { echo "up: the API did not start; see $RUN/api.log" >&2; tail -20 "$RUN/api.log" >&2; exit 1; }

# A development account, created once; its key is kept (mode 600) so `make up` can print it.
KEY_FILE="$REPO/.rgrid-dev/dev-api-key"
if [ ! -s "$KEY_FILE" ]; then
    if ! "$BIN/rgrid" admin create-account dev --with-key --json >"$KEY_FILE.json" 2>/dev/null; then
        "$BIN/rgrid" admin create-key dev --json >"$KEY_FILE.json"
    fi
    (umask 077; "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["api_key"])' \
        <"$KEY_FILE.json" >"$KEY_FILE")
    rm -f "$KEY_FILE.json"
fi
echo "API http://127.0.0.1:$RGRID_API_PORT  Flower http://127.0.0.1:$RGRID_FLOWER_PORT" >&2
echo "export RGRID_API_URL=http://127.0.0.1:$RGRID_API_PORT"
echo "export RGRID_API_KEY=$(cat "$KEY_FILE")"
