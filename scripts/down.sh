#!/usr/bin/env bash
# Stop exactly the processes `make up` started (by their pid files), and nothing else.
set -euo pipefail
RUN="$(cd "$(dirname "$0")/.." && pwd)/.rgrid-dev/run"
for name in flower beat worker api; do
    pidfile="$RUN/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "$name: stopped" >&2
    fi
    rm -f "$pidfile"
done
