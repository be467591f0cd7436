#!/usr/bin/env bash
# Install and run the local development/test services on loopback:
#   PostgreSQL  127.0.0.1:5432  (Debian cluster; role/db rgrid:rgrid)
#   Redis       127.0.0.1:6379  (private instance under .rgrid-dev/redis)
#   S3 (moto)   127.0.0.1:9000  (.venv/bin/moto_server, under .rgrid-dev/moto)
#
# Usage: scripts/services.sh install|start|stop|status
#
# Written for a Debian bookworm machine WITHOUT a running systemd (containers,
# CI VMs): daemons are started directly, never through systemctl/service.
# Every subcommand is idempotent; a second `start` only probes and returns.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="$REPO/.rgrid-dev"

# chromium: the headless browser that checks Flower's pages (tests/integration/test_flower.py).
PACKAGES=(postgresql redis-server mmdebstrap chromium)

PG_PORT=5432
PG_USER=rgrid
PG_PASSWORD=rgrid
PG_DB=rgrid
PG_LOG="$STATE_DIR/postgres/pg_ctlcluster.log"

REDIS_PORT=6379
REDIS_DIR="$STATE_DIR/redis"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
REDIS_START_LOG="$REDIS_DIR/redis-start.log" # output before --logfile applies
# Redis is the broker and holds the live logs. noeviction: Redis never drops a key to make
# room (an evicted task or unacked message would be a lost execution); at the limit it
# refuses writes instead. The limit must therefore sit above what can be there at once:
# the broker's messages (kilobytes each) plus one live log per running execution, each at
# most RGRID_MAX_LOG_BYTES (64 MiB, counted in stored bytes). 1 GiB holds 14 such floods at
# once besides the broker; raise it with the number of worker slots.
REDIS_MAXMEMORY="1gb"

MOTO_PORT=9000
MOTO_BIN="$REPO/.venv/bin/moto_server"
MOTO_DIR="$STATE_DIR/moto"
MOTO_PIDFILE="$MOTO_DIR/moto.pid"
MOTO_LOG="$MOTO_DIR/moto.log"

# Seconds to wait for each service to answer after starting it.
PG_WAIT=30
REDIS_WAIT=15
MOTO_WAIT=60

# ---------------------------------------------------------------- helpers

log() { printf '%s\n' "$*" >&2; }
die() { printf 'services.sh: error: %s\n' "$*" >&2; exit 1; }

# Privilege escalation: we run as root in CI; elsewhere use sudo if present
# (without either, commands run as-is and fail with their own error).
AS_ROOT=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    AS_ROOT=(sudo)
fi

as_root() { "${AS_ROOT[@]}" "$@"; }

# Run a command as the postgres OS user (peer auth on the unix socket).
# `cd /` avoids "could not change directory" noise when the cwd is private.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    elif [ "$(id -un)" = postgres ]; then
        (cd / && "$@")
    elif command -v sudo >/dev/null 2>&1; then
        (cd / && sudo -u postgres -- "$@")
    else
        die "need root or sudo to run '$*' as the postgres user"
    fi
}

# Close every inherited file descriptor above 2. Without this a daemon keeps
# e.g. a caller's pipe (make's jobserver, a CI log pipe on fd 3+) open and the
# caller waits forever for EOF. Only call it inside a subshell that then execs.
close_extra_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ]; then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
}

# wait_for SECONDS CMD...: poll CMD until it succeeds; false on timeout.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.2
    done
}

# pid_alive PIDFILE PATTERN: true if the pidfile's process runs and its
# command line matches PATTERN (guards against a recycled pid).
pid_alive() {
    local pidfile=$1 pattern=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"
}

# stop_pidfile NAME PIDFILE PATTERN: TERM, wait up to 10 s, then KILL.
stop_pidfile() {
    local name=$1 pidfile=$2 pattern=$3 pid i
    if ! pid_alive "$pidfile" "$pattern"; then
        rm -f "$pidfile"
        log "$name: not running (nothing started by this script)"
        return 0
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        log "$name: killed (pid $pid did not exit on TERM)"
    else
        log "$name: stopped"
    fi
    rm -f "$pidfile"
}

show_log_tail() {
    if [ -f "$1" ]; then
        log "---- last lines of $1 ----"
        tail -n 20 "$1" >&2 || true
    fi
}

# ---------------------------------------------------------------- install

package_installed() {
    dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        package_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "install: all packages present (${PACKAGES[*]})"
        return 0
    fi
    log "install: installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    log "install: done"
}

require_commands() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 ||
            die "'$c' not found; run: scripts/services.sh install"
    done
}

# ---------------------------------------------------------------- postgres

pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 1; }

# Prints "VERSION CLUSTER" of the Debian cluster configured on $PG_PORT,
# creating a "main" cluster for the newest installed server if none exists.
pg_cluster() {
    local line ver
    line=$(pg_lsclusters --no-header 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }')
    if [ -n "$line" ]; then
        printf '%s\n' "$line"
        return 0
    fi
    # No cluster on our port (e.g. create_main_cluster=false): make one.
    ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    [ -n "$ver" ] || die "postgres: no server version under /usr/lib/postgresql; run: scripts/services.sh install"
    log "postgres: creating cluster $ver/main on port $PG_PORT"
    as_root pg_createcluster "$ver" main --port "$PG_PORT" >&2
    printf '%s main\n' "$ver"
}

pg_ensure_role_and_db() {
    # Re-applying the password/attributes every time keeps this idempotent
    # even if someone altered the role by hand.
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres >/dev/null <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
-- CREATE DATABASE cannot run inside DO/transaction blocks: use \gexec.
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
SQL
}

start_postgres() {
    require_commands pg_lsclusters pg_ctlcluster pg_isready psql
    local cluster ver name
    if pg_up; then
        log "postgres: already running"
    else
        cluster=$(pg_cluster)
        read -r ver name <<<"$cluster"
        mkdir -p "$(dirname "$PG_LOG")"
        # pg_ctlcluster notices there is no systemd (/run/systemd/system) and
        # starts the server directly via pg_ctl. It also recreates
        # /var/run/postgresql if a reboot wiped /run.
        # Retried a few times: right after a crashed postmaster (kill -9) its
        # zombie/children linger ~2 s and the new one refuses the socket lock.
        local attempt
        for attempt in 1 2 3 4 5; do
            if (close_extra_fds
                exec "${AS_ROOT[@]}" pg_ctlcluster "$ver" "$name" start \
                    </dev/null >>"$PG_LOG" 2>&1); then
                break
            fi
            if [ "$attempt" -eq 5 ]; then
                # "already running" but not answering on TCP ends here too.
                show_log_tail "$PG_LOG"
                show_log_tail "/var/log/postgresql/postgresql-$ver-$name.log"
                die "postgres: pg_ctlcluster $ver $name start failed"
            fi
            log "postgres: start attempt $attempt failed, retrying"
            sleep 1
        done
        if ! wait_for "$PG_WAIT" pg_up; then
            show_log_tail "/var/log/postgresql/postgresql-$ver-$name.log"
            die "postgres: not answering on 127.0.0.1:$PG_PORT after ${PG_WAIT}s"
        fi
        log "postgres: started (cluster $ver/$name)"
    fi
    pg_ensure_role_and_db
}

stop_postgres() {
    local ver name status
    if ! command -v pg_lsclusters >/dev/null 2>&1; then
        log "postgres: not installed"
        return 0
    fi
    read -r ver name status < <(pg_lsclusters --no-header 2>/dev/null |
        awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4; exit }') || true
    if [ -z "${ver:-}" ]; then
        log "postgres: no cluster on port $PG_PORT"
    elif [ "$status" != online ]; then
        log "postgres: not running"
    else
        as_root pg_ctlcluster "$ver" "$name" stop </dev/null >&2
        log "postgres: stopped (cluster $ver/$name)"
    fi
}

# ---------------------------------------------------------------- redis

redis_up() {
    [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

start_redis() {
    require_commands redis-server redis-cli
    if redis_up; then
        log "redis: already running"
        return 0
    fi
    mkdir -p "$REDIS_DIR"
    # No config file: Debian's /etc/redis/redis.conf belongs to the system
    # instance. --daemonize makes redis-server fork and return.
    if ! (close_extra_fds
          exec redis-server \
              --bind 127.0.0.1 --port "$REDIS_PORT" \
              --daemonize yes \
              --dir "$REDIS_DIR" \
              --pidfile "$REDIS_PIDFILE" \
              --logfile "$REDIS_LOG" \
              --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy noeviction \
              </dev/null >>"$REDIS_START_LOG" 2>&1); then
        show_log_tail "$REDIS_START_LOG"
        die "redis: redis-server failed to start"
    fi
    if ! wait_for "$REDIS_WAIT" redis_up; then
        show_log_tail "$REDIS_LOG"
        die "redis: no PONG from 127.0.0.1:$REDIS_PORT after ${REDIS_WAIT}s"
    fi
    log "redis: started (pid $(cat "$REDIS_PIDFILE" 2>/dev/null || echo '?'))"
}

stop_redis() { stop_pidfile redis "$REDIS_PIDFILE" redis-server; }

# ---------------------------------------------------------------- moto (S3)

moto_up() {
    curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$MOTO_PORT/"
}

start_moto() {
    require_commands curl setsid nohup
    if moto_up; then
        log "s3 (moto): already running"
        return 0
    fi
    [ -x "$MOTO_BIN" ] ||
        die "s3 (moto): $MOTO_BIN not found; create the venv first (make setup / pip install 'moto[server]')"
    mkdir -p "$MOTO_DIR"
    rm -f "$MOTO_PIDFILE"
    # setsid: own session, no controlling tty, not in the caller's process
    # group (so Ctrl-C / CI job teardown of the caller doesn't hit it).
    # The inner shell writes its own pid and execs moto, so the pidfile is
    # right even if setsid had to fork.
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
    (
        close_extra_fds
        exec setsid nohup bash -c 'echo "$$" >"$0"; exec "$@"' \
            "$MOTO_PIDFILE" "$MOTO_BIN" -H 127.0.0.1 -p "$MOTO_PORT" \
            </dev/null >>"$MOTO_LOG" 2>&1
    ) &
    local deadline=$((SECONDS + MOTO_WAIT))
    until moto_up; do
        if [ -s "$MOTO_PIDFILE" ] && ! pid_alive "$MOTO_PIDFILE" moto_server; then
            show_log_tail "$MOTO_LOG"
            die "s3 (moto): moto_server exited during startup"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log_tail "$MOTO_LOG"
            die "s3 (moto): not answering on http://127.0.0.1:$MOTO_PORT/ after ${MOTO_WAIT}s"
        fi
        sleep 0.2
    done
    log "s3 (moto): started (pid $(cat "$MOTO_PIDFILE"))"
}

stop_moto() { stop_pidfile "s3 (moto)" "$MOTO_PIDFILE" moto_server; }

# ---------------------------------------------------------------- commands

cmd_start() {
    start_postgres
    start_redis
    start_moto
}

cmd_stop() {
    stop_moto
    stop_redis
    stop_postgres
}

cmd_status() {
    local rc=0
    if command -v pg_isready >/dev/null 2>&1 && pg_up; then
        echo "postgres: up (127.0.0.1:$PG_PORT)"
    else
        echo "postgres: down"; rc=1
    fi
    if command -v redis-cli >/dev/null 2>&1 && redis_up; then
        echo "redis: up (127.0.0.1:$REDIS_PORT)"
    else
        echo "redis: down"; rc=1
    fi
    if moto_up; then
        echo "s3 (moto): up (http://127.0.0.1:$MOTO_PORT)"
    else
        echo "s3 (moto): down"; rc=1
    fi
    return "$rc"
}

usage() {
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
}

main() {
    [ $# -eq 1 ] || usage
    case "$1" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *) usage ;;
    esac
}

main "$@"
