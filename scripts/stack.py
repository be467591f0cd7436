"""The one launcher of the RGrid stack on loopback: the API under gunicorn, a Celery worker (run
under scripts/supervise.sh, so it starts again whenever it exits, as systemd's Restart=always
would), beat and Flower. `make up`, the end-to-end tests and the benchmark all start their
processes here, with these command lines.

    python scripts/stack.py up [options]   # `make up`: background processes with pid files
                                           # under .rgrid-dev/run; prints `export` lines
    python scripts/stack.py up --hosts 3   # `make up HOSTS=3`: three worker hosts, each a
                                           # Docker engine of its own (scripts/hosts.py)
                                           # under .rgrid-dev/hosts plus a worker bound to it
    python scripts/stack.py down           # `make down`: stops exactly what `up` started
    python scripts/stack.py migrate        # `make db`: the development database's schema

Tests and the benchmark use :class:`Stack` (a context manager) on a database, Redis database
and queue of their own; :func:`fresh_database` makes such a database. The services' addresses
come from scripts/dev.env, read here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `scripts.hosts` lives beside this file
    sys.path.insert(0, str(REPO))

from scripts import hosts  # noqa: E402 - needs the path above when run as a script
from scripts.processes import stop_group  # noqa: E402

#: The virtualenv running this launcher: its gunicorn, celery and rgrid are the ones started.
BIN = Path(sys.executable).parent
DEV_ENV_FILE = REPO / "scripts" / "dev.env"
SUPERVISE = REPO / "scripts" / "supervise.sh"
#: `make up`'s pid files, logs and beat schedule.
RUN_DIR = REPO / ".rgrid-dev" / "run"
#: `make up HOSTS=N`'s Docker engines and worker data, one folder per host.
HOSTS_DIR = REPO / ".rgrid-dev" / "hosts"
#: The development account's key, created once by `make up` (mode 600).
KEY_FILE = REPO / ".rgrid-dev" / "dev-api-key"
#: The order `up` starts them in; `down` stops them in the reverse order.
ROLES = ("api", "worker", "beat", "flower")
#: How long the API may take to answer /healthz.
START_TIMEOUT_S = 30.0


def dev_env() -> dict[str, str]:
    """The local services' addresses and credentials (scripts/dev.env)."""
    values = {}
    for line in DEV_ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fresh_database(prefix: str = "rgrid_test") -> Iterator[str]:
    """An empty PostgreSQL database of its own on the development server, dropped (with any
    connection still open to it) on the way out. Migrating it is the caller's business."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    base = dev_env()["RGRID_DATABASE_URL"]
    name = f"{prefix}_{secrets.token_hex(4)}"
    # No pooled connection: a test restarts PostgreSQL, and the drop must still reach it.
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the command lines ------------------------------------------------------------------------


def api_command(port: int) -> list[str]:
    return [
        str(BIN / "gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"),
        # The multiprocess metrics hooks (rgrid/core/metrics.py).
        *("--config", "python:rgrid.api.gunicorn_conf"),
        *("--access-logfile", "-"),
        "rgrid.api:create_app()",
    ]


def _celery(*args: str) -> list[str]:
    return [str(BIN / "celery"), "-A", "workers.celery_app", *args]


def worker_command(
    hostname: str, *, concurrency: int = 2, supervised: bool = True, queues: str | None = None
) -> list[str]:
    """A Celery worker; ``supervised``: under scripts/supervise.sh (a broker restart has killed
    celery 5.7's main process here, and a killed worker must come back); ``queues``: the
    queues it consumes (the build pool's), or the shared one and its host's."""
    command = _celery(
        *("worker", "--loglevel", "INFO"),
        *("--concurrency", str(concurrency), "--hostname", f"{hostname}@%h"),
        *(("--queues", queues) if queues else ()),
    )
    return [str(SUPERVISE), *command] if supervised else command


def builder_command(
    hostname: str, queue: str, host: str, *, concurrency: int = 2, supervised: bool = True
) -> list[str]:
    """A host's build pool: a Celery worker of its own on the host's build queue, so that
    dependency installs never hold the run pool's slots (rgrid/host/slots.py). Its environment
    says RGRID_WORKER_POOL=build (see ``StackConfig.env_for``)."""
    from rgrid.host.hosts import build_queue

    return worker_command(
        f"{hostname}-build",
        concurrency=concurrency,
        supervised=supervised,
        queues=build_queue(queue, host),
    )


def beat_command(schedule: Path) -> list[str]:
    return _celery("beat", "--loglevel", "INFO", "--schedule", str(schedule))


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def flower_command(port: int, address: str = "127.0.0.1", basic_auth: str | None = None):
    """Flower on ``address``. Anywhere but loopback it shows every execution's tasks and can
    revoke them, so it is refused without credentials (``user:password``, handed to Flower
    in its own FLOWER_BASIC_AUTH variable by :meth:`StackConfig.env_for`, never on its
    command line where `ps` would show it)."""
    if address not in LOOPBACK and not basic_auth:
        raise RuntimeError(
            f"Flower on {address} needs credentials: set RGRID_FLOWER_BASIC_AUTH=user:password"
        )
    return _celery("flower", f"--address={address}", f"--port={port}")


# --- starting, waiting, stopping ----------------------------------------------------------------


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session of its own (so stopping it stops its children too), its output
    to ``log``, with nothing of the caller's inherited but its environment."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_healthy(url: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the API at ``url`` answers /healthz; RuntimeError with its log's tail if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
    raise RuntimeError(f"the API at {url} did not start within {timeout_s:.0f}s; {log}:\n{tail}")


def create_account_key(env: dict[str, str], account: str) -> str:
    """An API key for ``account``, creating the account unless it exists."""
    rgrid = str(BIN / "rgrid")
    created = subprocess.run(
        [rgrid, "admin", "create-account", account, "--with-key", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        created = subprocess.run(
            [rgrid, "admin", "create-key", account, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(created.stdout)["api_key"]


@dataclass
class StackConfig:
    """One stack: which processes, on which services, where their logs go."""

    #: Every process's environment: the RGRID_* settings (database, Redis, queue, bucket, ...).
    env: dict[str, str]
    log_dir: Path
    #: The worker's Celery hostname (before ``@host``).
    name: str
    api_port: int
    flower_port: int | None = None
    roles: tuple[str, ...] = ROLES
    supervised: bool = True
    concurrency: int = 2
    #: The build pool's concurrency on each host (its own slots: rgrid/host/slots.py).
    build_concurrency: int = 2
    #: Worker hosts: 0 is one worker on the machine's own Docker engine; N starts N engines
    #: under ``hosts_root`` and, in place of that worker, one worker bound to each.
    hosts: int = 0
    hosts_root: Path | None = None
    #: The worker host's metrics exporter (rgrid/core/metrics.py); None: a free port. With
    #: ``hosts``, each host's worker gets a free port of its own.
    worker_metrics_port: int | None = None
    _host_metrics_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.worker_metrics_port is None:
            given = self.env.get("RGRID_WORKER_METRICS_PORT")
            self.worker_metrics_port = int(given) if given else free_port()

    @property
    def worker_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_metrics_port}/metrics"

    def host_metrics_port(self, host: str) -> int:
        return self._host_metrics_ports.setdefault(host, free_port())

    def env_for(self, role: str) -> dict[str, str]:
        """A process's environment: the stack's; a host's worker talks to its own engine and
        keeps its caches in its own folder; the API and each worker host get a metrics folder
        of their own (prometheus-client's multiprocess mode; each is scraped on its own, so
        none may count another's files)."""
        env = {**self.env, "RGRID_WORKER_METRICS_PORT": str(self.worker_metrics_port)}
        for engine in self.engines:
            if role in (f"worker-{engine.name}", f"builder-{engine.name}"):
                env = host_env(env, engine)
                env["RGRID_WORKER_METRICS_PORT"] = str(self.host_metrics_port(engine.name))
        env["RGRID_WORKER_CONCURRENCY"] = str(self.concurrency)
        env["RGRID_BUILD_CONCURRENCY"] = str(self.build_concurrency)
        if role.startswith("builder"):
            # The run pool on the same host serves the host's metrics.
            env.update(RGRID_WORKER_POOL="build", RGRID_WORKER_METRICS_PORT="0")
        if role == "flower" and self.env.get("RGRID_FLOWER_BASIC_AUTH"):
            env["FLOWER_BASIC_AUTH"] = self.env["RGRID_FLOWER_BASIC_AUTH"]
        if role == "api" or role.startswith(("worker", "builder")):
            # A build pool writes its metrics beside its host's run pool, whose exporter
            # serves them both (a folder of its own would never be scraped).
            folder = self.log_dir / f"metrics-{role.replace('builder', 'worker', 1)}"
            folder.mkdir(parents=True, exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        return env

    @property
    def queue(self) -> str:
        """The deployment's queue, as the processes' settings read it (rgrid/core/config.py)."""
        return self.env.get("RGRID_QUEUE") or "rgrid"

    @property
    def host_name(self) -> str:
        """The one-engine stack's host name, as its workers' settings read it."""
        return self.env.get("RGRID_HOST_NAME") or socket.gethostname()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def engines(self) -> list[hosts.Engine]:
        if not self.hosts:
            return []
        return hosts.engines(self.hosts_root or self.log_dir / "hosts", self.hosts)

    def commands(self) -> dict[str, list[str]]:
        def worker(name: str) -> list[str]:
            return worker_command(name, concurrency=self.concurrency, supervised=self.supervised)

        def builder(name: str, host: str) -> list[str]:
            return builder_command(
                name,
                self.queue,
                host,
                concurrency=self.build_concurrency,
                supervised=self.supervised,
            )

        every = {
            "api": api_command(self.api_port),
            "worker": worker(self.name),
            "builder": builder(self.name, self.host_name),
        }
        for engine in self.engines:
            # In its engine's mount namespace: call once the engines run.
            command = worker(f"{self.name}-{engine.name}")
            every[f"worker-{engine.name}"] = (
                hosts.in_namespace(engine, command) if engine.pid() else command
            )
            command = builder(f"{self.name}-{engine.name}", host_env({}, engine)["RGRID_HOST_NAME"])
            every[f"builder-{engine.name}"] = (
                hosts.in_namespace(engine, command) if engine.pid() else command
            )
        every["beat"] = beat_command(self.log_dir / "beat-schedule")
        if self.flower_port is not None:
            every["flower"] = flower_command(
                self.flower_port,
                self.env.get("RGRID_FLOWER_ADDRESS", "127.0.0.1"),
                self.env.get("RGRID_FLOWER_BASIC_AUTH"),
            )
        chosen = [r for r in self.roles if r != "worker" or not self.hosts]
        if "worker" in self.roles:
            # Every worker host has its build pool beside its run pool (rgrid/host/slots.py).
            chosen += [f"builder-{e.name}" for e in self.engines] if self.hosts else ["builder"]
            if self.hosts:
                chosen += [f"worker-{engine.name}" for engine in self.engines]
        return {role: every[role] for role in every if role in chosen}


def host_env(env: dict[str, str], engine: hosts.Engine) -> dict[str, str]:
    return {
        **env,
        "DOCKER_HOST": engine.docker_host,
        "RGRID_DATA_DIR": str(engine.data_dir),
        "RGRID_HOST_NAME": engine.name,
    }


def runtime_images() -> tuple[str, ...]:
    """What every new engine gets loaded: the default runtime's image."""
    from rgrid.core.config import DEFAULT_RUNTIME
    from rgrid.host.runtimes import resolve_runtime

    return (resolve_runtime(DEFAULT_RUNTIME).image,)


class Stack:
    """The processes of one :class:`StackConfig`, started on entry and stopped on exit."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.processes: dict[str, subprocess.Popen] = {}
        # Engines under the log folder (tests) go with it; `make up`'s keep their images.
        self.engines = hosts.Engines(
            config.engines,
            runtime_images() if config.hosts else (),
            remove=config.hosts_root is None,
        )

    def __enter__(self) -> Stack:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.engines.__enter__()
            for role, command in self.config.commands().items():
                log = self.config.log_dir / f"{role}.log"
                self.processes[role] = spawn(command, self.config.env_for(role), log)
            if "api" in self.processes:
                wait_healthy(self.config.api_url, self.config.log_dir / "api.log")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        roles = list(reversed(list(self.processes)))
        host_workers = [r for r in roles if r.startswith("worker-")]
        for role in roles:
            if role not in host_workers:
                stop_group(self.processes.pop(role).pid)
            elif role == host_workers[0]:  # the hosts' workers side by side
                pids = [self.processes.pop(r).pid for r in host_workers]
                with ThreadPoolExecutor(max_workers=len(pids)) as pool:
                    list(pool.map(stop_group, pids))
        self.engines.__exit__()


# --- `make up` / `make down` -------------------------------------------------------------------


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

    dev = dev_env()
    chosen = {
        "RGRID_DATABASE_URL": database_url,
        "RGRID_REDIS_URL": redis_url,
        "RGRID_QUEUE": queue,
        "RGRID_API_PORT": api_port,
        "RGRID_FLOWER_PORT": flower_port,
        "RGRID_LEASE": lease_s,
    }
    env = {**os.environ, **dev, **{k: str(v) for k, v in chosen.items() if v is not None}}
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
    for engine in config.engines:
        # Not tied to this process, which exits at once: `make down` stops them.
        hosts.start(engine)
        for image in runtime_images():
            hosts.load_image(engine, image)
        print(f"engine {engine.name}: {engine.docker_host}", file=sys.stderr)
    for role, command in config.commands().items():
        if running_pid(role) is not None:
            print(f"{role}: already running", file=sys.stderr)
            continue
        log = RUN_DIR / f"{role}.log"
        log.unlink(missing_ok=True)
        _pid_file(role).write_text(f"{spawn(command, config.env_for(role), log).pid}\n")
        print(f"{role}: started (log {log})", file=sys.stderr)
    wait_healthy(config.api_url, RUN_DIR / "api.log")
    if not KEY_FILE.is_file() or not KEY_FILE.read_text().strip():
        key = create_account_key(env, "dev")
        KEY_FILE.touch(mode=0o600)
        KEY_FILE.write_text(key + "\n")
    print(f"API {config.api_url}  Flower http://127.0.0.1:{config.flower_port}", file=sys.stderr)
    print(f"worker metrics {config.worker_metrics_url}", file=sys.stderr)
    return {"RGRID_API_URL": config.api_url, "RGRID_API_KEY": KEY_FILE.read_text().strip()}


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
