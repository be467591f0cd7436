"""One RGrid stack's processes on loopback: :class:`StackConfig` (which processes, on which
services, with which environments; worker hosts as Docker engines of their own,
scripts/hosts.py) and :class:`Stack`, a context manager that starts them, waits for the API
and stops them. Tests and the benchmarks use it on a database, Redis database and queue of
their own; scripts/stack.py (`make up`) starts the same command lines in the background.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scripts import hosts
from scripts.commands import (
    BIN,
    api_command,
    beat_command,
    builder_command,
    flower_command,
    worker_command,
)
from scripts.devenv import REPO, free_port
from scripts.processes import stop_group

#: The order `up` starts them in; `down` stops them in the reverse order.
ROLES = ("api", "worker", "beat", "flower")
#: How long the API may take to answer /healthz.
START_TIMEOUT_S = 30.0


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
