"""Two worker hosts deployed as an operator deploys them (deploy/, README "Deploying"): each a
network namespace of its own behind a veth pair (scripts/netns.py) with its own dockerd, a
virtualenv holding only the installed wheel, and an environment file rendered from
deploy/rgrid.env as its whole configuration. They reach PostgreSQL, Redis, the S3 endpoint and
the API on the main namespace's veth address, where forwarders listen (the shared services
stay on loopback, untouched). Beat and the API run in the main namespace from the same wheel.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rgrid import cache_keys, queueing
from rgrid.context import redis_client
from rgrid.db import session_scope
from rgrid.hosts import HostRegistry
from rgrid.logbuffer import decode_log
from rgrid.models import Execution
from rgrid.statuses import TERMINAL_STATUSES
from scripts import hosts, netns
from scripts.stack import free_port, runtime_images, stop_group, wait_healthy
from tests.conftest import DEV_ENV

HOSTS = ("n1", "n2")
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "rgrid.env"
#: A running execution's lease on these hosts: a host cut off longer than this loses its runs.
LEASE_S = 20


class Supervised:
    """A process started again whenever it exits (systemd's Restart=always), tied to this
    test process (it gets SIGTERM if the test session dies)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.command, self.env, self.log, self.cwd = command, env, log, cwd
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Supervised:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=hosts._die_with_parent,
            )
        self.starts += 1

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if self.process is not None and self.process.poll() is not None:
                self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.process is not None:
            stop_group(self.process.pid)


@dataclass
class Grid:
    root: Path
    bin: Path
    queue: str
    nets: dict[str, netns.NetHost]
    env_files: dict[str, Path]
    workers: dict[str, Supervised]
    registry: HostRegistry
    app: object
    api_port: int
    timings: dict[str, float] = field(default_factory=dict)

    def host_env(self, name: str) -> dict[str, str]:
        """A host's process environment: its env file and nothing of this test's."""
        return {
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.nets[name].engine.dir),
            "LANG": "C.UTF-8",
            **netns.read_env_file(self.env_files[name]),
        }

    def on_host(self, name: str, *args: str, timeout: float = 120):
        """``rgrid ARGS`` run on host ``name``, as its operator would."""
        return subprocess.run(
            self.nets[name].command([str(self.bin / "rgrid"), *args]),
            env=self.host_env(name),
            cwd=self.nets[name].engine.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def enqueue(self, ids: list[str]) -> None:
        for execution_id in ids:
            queueing.enqueue_pipeline(self.app, execution_id)


def _on(url: str, address: str) -> str:
    """``url`` with its host (loopback here) replaced by ``address``."""
    parts = urlsplit(url)
    netloc = parts.netloc.replace(parts.hostname or "", address, 1)
    return parts._replace(netloc=netloc).geturl()


def _port(url: str) -> int:
    parsed = urlsplit(url)
    assert parsed.port is not None, url
    return parsed.port


@pytest.fixture(scope="module")
def grid(server_settings, tmp_path_factory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("deploy")
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheel = netns.build_wheel(root)
    timings["wheel build"] = time.monotonic() - started
    started = time.monotonic()
    bin_dir = netns.install_wheel(wheel, root / "venv")
    timings["wheel install"] = time.monotonic() - started

    queue = f"{os.environ['RGRID_QUEUE']}-net"
    services = {
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
    }
    api_port = free_port()
    common = {
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "AWS_ACCESS_KEY_ID": DEV_ENV["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": DEV_ENV["AWS_SECRET_ACCESS_KEY"],
        "RGRID_SECRET_KEY": os.environ["RGRID_SECRET_KEY"],
        "RGRID_QUEUE": queue,
        "RGRID_LEASE": str(LEASE_S),
        "RGRID_DEFAULT_TIMEOUT": "120",
        "RGRID_POOL_SIZE": "1",
        "RGRID_POOL_MAX": "2",
    }
    logs = root / "logs"
    logs.mkdir()
    engines = [hosts.Engine(name, root / "hosts") for name in HOSTS]
    subnet = netns.free_subnet()
    nets = {e.name: netns.NetHost(e, subnet, i) for i, e in enumerate(engines)}
    processes: list[Supervised] = []
    started = time.monotonic()
    with hosts.Engines(engines, runtime_images(), remove=True):
        timings["engine start + runtime image load (2 hosts)"] = time.monotonic() - started
        try:
            for net in nets.values():
                net.connect()
            routes = [
                (net.main_address, port, port)
                for net in nets.values()
                for port in [*(_port(u) for u in services.values()), api_port]
            ]
            with netns.Forwarder(routes):
                # The main namespace's roles: the API and beat, on loopback.
                main_file = netns.render_env_file(
                    TEMPLATE, {**services, **common}, root / "main.env"
                )
                main_env = {
                    "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(root),
                    "LANG": "C.UTF-8",
                    "PROMETHEUS_MULTIPROC_DIR": str(logs),
                    **netns.read_env_file(main_file),
                }
                python = str(bin_dir / "python")
                api = [python, "-m", "gunicorn", "--bind", f"127.0.0.1:{api_port}"]
                api += ["--workers", "1", "--threads", "4", "rgrid.api:create_app()"]
                processes.append(Supervised(api, main_env, logs / "api.log", root).start())
                beat = [python, "-m", "celery", "-A", "workers.celery_app", "beat"]
                beat += ["--schedule", str(root / "beat-schedule")]
                processes.append(Supervised(beat, main_env, logs / "beat.log", root).start())
                wait_healthy(f"http://127.0.0.1:{api_port}", logs / "api.log")

                env_files = {}
                for name, net in nets.items():
                    (net.engine.dir / "metrics").mkdir(exist_ok=True)
                    values = {
                        **{k: _on(v, net.main_address) for k, v in services.items()},
                        **common,
                        "RGRID_HOST_NAME": name,
                        "RGRID_DATA_DIR": str(net.engine.data_dir),
                        "DOCKER_HOST": net.engine.docker_host,
                        "RGRID_API_URL": f"http://{net.main_address}:{api_port}",
                        "PROMETHEUS_MULTIPROC_DIR": str(net.engine.dir / "metrics"),
                    }
                    env_files[name] = netns.render_env_file(
                        TEMPLATE, values, net.engine.dir / "rgrid.env"
                    )
                app = queueing.create_celery_app()
                app.conf.task_default_queue = queue
                grid = Grid(
                    root=root,
                    bin=bin_dir,
                    queue=queue,
                    nets=nets,
                    env_files=env_files,
                    workers={},
                    registry=HostRegistry(redis_client(server_settings.redis_url), queue),
                    app=app,
                    api_port=api_port,
                    timings=timings,
                )
                for name, net in nets.items():
                    worker = [python, "-m", "celery", "-A", "workers.celery_app", "worker"]
                    worker += ["--loglevel", "INFO", "--concurrency", "2"]
                    worker += ["--hostname", f"{name}@%h"]
                    grid.workers[name] = Supervised(
                        net.command(worker),
                        grid.host_env(name),
                        logs / f"worker-{name}.log",
                        net.engine.dir,
                    ).start()
                    processes.append(grid.workers[name])
                netns.wait_for(
                    "both hosts' heartbeats",
                    lambda: all(grid.registry.alive(n) for n in HOSTS),
                    90,
                )
                yield grid
        finally:
            for process in reversed(processes):
                process.stop()
            for net in nets.values():
                net.disconnect()
            client = redis_client(server_settings.redis_url)
            for pattern in (f"rgrid:{queue}:*", f"_kombu.binding*{queue}*"):
                for key in client.scan_iter(pattern):
                    client.delete(key)


def _rows(ctx, ids: list[str]) -> list[Execution]:
    with session_scope(ctx.session_factory) as session:
        rows = [session.get(Execution, i) for i in ids]
        session.expunge_all()
    return rows


def _log(ctx, execution_id: str, stream: str) -> str:
    chunks = decode_log(ctx.store.get_bytes(cache_keys.log_object_key(execution_id)))
    return "".join(text for s, text in chunks if s == stream)


def _wait_terminal(ctx, ids: list[str], timeout_s: float = 180) -> list[Execution]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(ctx, ids)
        if all(r.status in TERMINAL_STATUSES for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


SCRIPT = (
    "import sys, time\n"
    "time.sleep(1)\n"
    "print('done', sys.argv[1])\n"
    "open('outputs/result.txt', 'w').write(sys.argv[1])\n"
)


def test_a_new_host_reaches_every_service_over_its_own_link_only(grid):
    for name, net in grid.nets.items():
        # Its namespace holds its loopback and its link, and no way anywhere else.
        assert sorted(net.interfaces()) == ["lo", net.main_link[:-1] + "h"]
        assert not [r for r in net.routes() if r.startswith("default")]
        result = grid.on_host(name, "admin", "check")
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = result.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["ok", "database"],
            ["ok", "broker"],
            ["ok", "store"],
            ["ok", "docker"],
            ["ok", "api"],
        ], lines
        for line in (lines[0], lines[1], lines[2], lines[4]):
            assert net.main_address in line, line
        # Its RGrid is the wheel's, not this checkout's.
        where = subprocess.run(
            net.command([str(grid.bin / "python"), "-c", "import rgrid; print(rgrid.__file__)"]),
            env=grid.host_env(name),
            cwd=net.engine.dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(where).is_relative_to(grid.bin.parent), where


def test_every_host_may_migrate_at_once(grid):
    running = [
        subprocess.Popen(
            grid.nets[name].command([str(grid.bin / "rgrid"), "admin", "migrate"]),
            env=grid.host_env(name),
            cwd=grid.nets[name].engine.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in HOSTS
    ]
    for process in running:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out.startswith("database is up to date (schema "), out


def test_a_host_cut_off_mid_batch_loses_nothing_and_drains_when_it_is_back(ctx, grid, submit):
    ids = [submit(SCRIPT, args=[str(i)]) for i in range(24)]
    grid.enqueue(ids)

    def ran_on_both() -> bool:
        done = [r for r in _rows(ctx, ids) if r.status == "succeeded"]
        return {r.host for r in done} == set(HOSTS)

    netns.wait_for("runs on both hosts", ran_on_both, 120)
    cut_at = time.time()
    grid.nets["n2"].link(up=False)
    try:
        # n2 stops renewing its heartbeat; what waits for it moves to n1, and n1 runs the
        # rest: all that is left open while n2 is still cut off is what n2's worker holds
        # (two tasks at most: two slots, one prefetched each), on n2 or not yet pinned.
        netns.wait_for("n2 to be taken for gone", lambda: not grid.registry.alive("n2"), 60)

        def only_n2_runs_left() -> bool:
            rows = _rows(ctx, ids)
            open_ = [r for r in rows if r.status not in TERMINAL_STATUSES]
            return len(open_) <= 2 and all(r.host in ("n2", None) for r in open_)

        netns.wait_for("n1 to take n2's waiting work", only_n2_runs_left, 150, every_s=1)
        rows = _rows(ctx, ids)
        after_cut = [r for r in rows if r.finished_at and r.finished_at.timestamp() > cut_at]
        assert any(r.host == "n1" for r in after_cut), [(r.host, r.status) for r in rows]
    finally:
        grid.nets["n2"].link(up=True)

    rows = _wait_terminal(ctx, ids)

    assert all(r.status in TERMINAL_STATUSES for r in rows), [(r.id, r.status) for r in rows]
    for i, row in enumerate(rows):
        if row.status == "succeeded":
            assert _log(ctx, row.id, "stdout") == f"done {i}\n", (
                row.host,
                _log(ctx, row.id, "phase"),
                _log(ctx, row.id, "stderr"),
            )
            assert [o["path"] for o in row.outputs] == ["result.txt"]
        else:  # a run n2 held while cut off past its lease: it says so, nothing else is lost
            assert row.host == "n2" and row.status == "error" and row.error, row
    assert sum(r.status != "succeeded" for r in rows) <= 2  # n2 runs two at a time

    # Back on the network, n2 is drained from its own console: it finishes its runs, takes
    # no new work, and says so.
    drained = grid.on_host("n2", "admin", "drain", "n2", "--wait", "--timeout", "120")
    assert drained.returncode == 0, (drained.stdout, drained.stderr)
    assert drained.stdout.splitlines()[-1] == "n2: drained: nothing running, nothing new"
    later = [submit(SCRIPT, args=[f"later-{i}"]) for i in range(6)]
    grid.enqueue(later)
    rows = _wait_terminal(ctx, later)
    assert [r.status for r in rows] == ["succeeded"] * 6, [(r.status, r.error) for r in rows]
    assert {r.host for r in rows} == {"n1"}
    assert not grid.registry.alive("n2")

    undrained = grid.on_host("n2", "admin", "undrain", "n2")
    assert undrained.stdout == "n2: taking work again\n", undrained
    netns.wait_for("n2's heartbeat again", lambda: grid.registry.alive("n2"), 30)
