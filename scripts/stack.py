"""`make up`, `make down` and `make db`: the development stack on loopback in the background,
started with the one launcher's command lines and environments (scripts/launcher.py): the API
under gunicorn, a Celery worker (run under scripts/supervise.sh, so it starts again whenever it
exits, as systemd's Restart=always would), beat and Flower.

    python scripts/stack.py up [options]   # `make up`: background processes with pid files
                                           # under .rgrid-dev/run; prints `export` lines
    python scripts/stack.py up --hosts 3   # `make up HOSTS=3`: three worker hosts, each a
                                           # Docker engine of its own (scripts/hosts.py)
                                           # under .rgrid-dev/hosts plus a worker bound to it
    python scripts/stack.py down           # `make down`: stops exactly what `up` started
    python scripts/stack.py migrate        # `make db`: the development database's schema

Tests and the benchmarks use :class:`scripts.launcher.Stack` (a context manager) on a database,
Redis database and queue of their own; :func:`scripts.devenv.fresh_database` makes such a
database. The services' addresses come from scripts/dev.env (scripts/devenv.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `scripts.*` lives beside this file
    sys.path.insert(0, str(REPO))

from scripts import hosts  # noqa: E402 - needs the path above when run as a script
from scripts.devenv import dev_env  # noqa: E402
from scripts.launcher import (  # noqa: E402
    StackConfig,
    create_account_key,
    runtime_images,
    spawn,
    wait_healthy,
)
from scripts.processes import stop_group  # noqa: E402

#: `make up`'s pid files, logs and beat schedule.
RUN_DIR = REPO / ".rgrid-dev" / "run"
#: `make up HOSTS=N`'s Docker engines and worker data, one folder per host.
HOSTS_DIR = REPO / ".rgrid-dev" / "hosts"
#: The development account's key, created once by `make up` (mode 600).
KEY_FILE = REPO / ".rgrid-dev" / "dev-api-key"


def _pid_file(role: str) -> Path:
    return RUN_DIR / f"{role}.pid"


def running_pid(role: str) -> int | None:
    """The pid of `make up`'s process ``role`` if it still runs."""
    try:
        pid = int(_pid_file(role).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    queue: str | None = None,
    api_port: int | None = None,
    flower_port: int | None = None,
    lease_s: int | None = None,
    supervised: bool = True,
    hosts_count: int = 0,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Start (or find running) the development stack in the background; returns the variables
    that point the CLI at it (RGRID_API_URL, RGRID_API_KEY). Progress goes to stderr."""
    from rgrid.core.db import upgrade

    chosen = {
        "RGRID_DATABASE_URL": database_url,
        "RGRID_REDIS_URL": redis_url,
        "RGRID_QUEUE": queue,
        "RGRID_API_PORT": api_port,
        "RGRID_FLOWER_PORT": flower_port,
        "RGRID_LEASE": lease_s,
    }
    env = {**os.environ, **dev_env(), **{k: str(v) for k, v in chosen.items() if v is not None}}
    env.update(extra_env or {})
    config = StackConfig(
        env=env,
        log_dir=RUN_DIR,
        name=f"rgrid-worker-{os.getpid()}",
        api_port=int(env["RGRID_API_PORT"]),
        flower_port=int(env["RGRID_FLOWER_PORT"]),
        supervised=supervised,
        hosts=hosts_count,
        hosts_root=HOSTS_DIR,
    )
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    upgrade(env["RGRID_DATABASE_URL"])
    start_engines(config)
    start_roles(config)
    wait_healthy(config.api_url, RUN_DIR / "api.log")
    key = dev_key(env)
    print(f"API {config.api_url}  Flower http://127.0.0.1:{config.flower_port}", file=sys.stderr)
    print(f"worker metrics {config.worker_metrics_url}", file=sys.stderr)
    return {"RGRID_API_URL": config.api_url, "RGRID_API_KEY": key}


def start_engines(config: StackConfig) -> None:
    """With worker hosts: each host's Docker engine, with the runtime images loaded. Not
    tied to this process, which exits at once: `make down` stops them."""
    for engine in config.engines:
        hosts.start(engine)
        for image in runtime_images():
            hosts.load_image(engine, image)
        print(f"engine {engine.name}: {engine.docker_host}", file=sys.stderr)


def start_roles(config: StackConfig) -> None:
    """Every role not already running, in the background, its pid in its pid file and its
    output in a new log under RUN_DIR."""
    for role, command in config.commands().items():
        if running_pid(role) is not None:
            print(f"{role}: already running", file=sys.stderr)
            continue
        log = RUN_DIR / f"{role}.log"
        log.unlink(missing_ok=True)
        _pid_file(role).write_text(f"{spawn(command, config.env_for(role), log).pid}\n")
        print(f"{role}: started (log {log})", file=sys.stderr)


def dev_key(env: dict[str, str]) -> str:
    """The development account's API key: KEY_FILE's, created there once (mode 600)."""
    if not KEY_FILE.is_file() or not KEY_FILE.read_text().strip():
        key = create_account_key(env, "dev")
        KEY_FILE.touch(mode=0o600)
        KEY_FILE.write_text(key + "\n")
    return KEY_FILE.read_text().strip()


def down() -> None:
    """Stop exactly the processes `up` started (by their pid files), and nothing else: the
    roles, every host's worker, then the hosts' Docker engines."""
    from concurrent.futures import ThreadPoolExecutor

    def stop_role(role: str) -> None:
        pid = running_pid(role)
        if pid is not None and stop_group(pid):
            print(f"{role}: stopped", file=sys.stderr)
        _pid_file(role).unlink(missing_ok=True)

    def stop_engine(engine: hosts.Engine) -> None:
        if hosts.stop(engine, kill=True):
            print(f"engine {engine.name}: stopped", file=sys.stderr)

    workers = [
        "worker",
        "builder",
        *sorted(p.stem for p in RUN_DIR.glob("worker-h*.pid")),
        *sorted(p.stem for p in RUN_DIR.glob("builder-h*.pid")),
    ]
    engines = [hosts.Engine(p.parent.name, HOSTS_DIR) for p in HOSTS_DIR.glob("h*/dockerd.pid")]
    # Each takes seconds to stop (a warm shutdown, a dockerd's): the workers side by side,
    # then the engines side by side.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for group in (["flower", "beat"], workers, ["api"]):
            list(pool.map(stop_role, group))
        list(pool.map(stop_engine, engines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop the RGrid stack on loopback.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start it; print `export` lines for the CLI")
    start.add_argument("--database-url", help="default: scripts/dev.env's")
    start.add_argument("--redis-url", help="the broker, with its database number")
    start.add_argument("--queue", help="the Celery queue (default: the settings' own)")
    start.add_argument("--api-port", type=int)
    start.add_argument("--flower-port", type=int)
    start.add_argument("--lease", type=int, dest="lease_s", help="RGRID_LEASE, seconds")
    start.add_argument(
        "--no-supervise", dest="supervised", action="store_false", help="run the worker bare"
    )
    start.add_argument(
        "--hosts",
        type=int,
        default=0,
        dest="hosts_count",
        help="worker hosts, each a Docker engine of its own (default: the machine's one)",
    )
    commands.add_parser("down", help="stop what `up` started")
    commands.add_parser("migrate", help="bring scripts/dev.env's database to the newest schema")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "down":
        down()
        return 0
    try:
        if command == "migrate":
            from rgrid.core.db import upgrade

            upgrade(dev_env()["RGRID_DATABASE_URL"])
            return 0
        exports = up(**args)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for `make`
        print(f"stack: {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for name, value in exports.items():
        print(f"export {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
