#!/usr/bin/env bash
# Run a command and start it again whenever it exits, as systemd's Restart=always does; stop
# (TERM, INT or HUP) stops the command and this loop. Used by `make up` for the Celery worker.
set -u
child=0
stop() {
    trap - TERM INT HUP
    [ "$child" -ne 0 ] && kill -TERM "$child" 2>/dev/null && wait "$child"
    exit 0
}
trap stop TERM INT HUP
while true; do
    "$@" &
    child=$!
    wait "$child"
    status=$?
    echo "supervise: '$1' exited with status $status; starting it again in 1 s" >&2
    sleep 1
done
