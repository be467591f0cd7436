"""Worker hosts that share nothing with this machine but a network link: each is a Docker engine
(scripts/hosts.py) whose network namespace gets one end of a veth pair and an address of its
own, with a virtualenv holding only the installed wheel and an environment file as its whole
configuration, as a real machine of an operator's would have.

The services stay where they are (the shared PostgreSQL, Redis and S3 endpoint listen on
loopback and must not be reconfigured or restarted): :class:`Forwarder` listens on the main
namespace's end of each veth pair and forwards to them, so a host reaches "the database at
10.231.x.1:5432" and nothing else. A host's namespace holds only ``lo`` and its veth end and
no default route: its traffic cannot leave the links made here.

Who ends what: the engines are :class:`scripts.hosts.Engines` (stopped on exit, and tied to
this process by PR_SET_PDEATHSIG); deleting the main end of a veth pair deletes both ends;
:class:`Forwarder` closes its listeners and connections on exit. A namespace goes away with
its last process (its dockerd and the worker that joined it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rgrid.core import cache_keys, queueing
from rgrid.host.hosts import HostRegistry
from rgrid.service.context import redis_client
from scripts import hosts
from scripts.devenv import free_port, read_env_file
from scripts.launcher import runtime_images, wait_healthy
from scripts.processes import stop_group

REPO = Path(__file__).resolve().parent.parent
#: Addresses for the veth pairs: one /24 of this block per grid, one /30 per host in it.
BLOCK = ipaddress.ip_network("10.231.0.0/16")
#: What a source tree holds that is not part of the product (the wheel build must not see it).
NOT_SOURCE = (".git", ".venv", ".rgrid-dev", "build", "dist", "*.egg-info", "__pycache__")


def _ip(*args: str, pid: int | None = None) -> str:
    command = ["ip", *args] if pid is None else ["nsenter", "-t", str(pid), "-n", "ip", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of :data:`BLOCK` no interface of this machine has an address in."""
    used = _ip("-4", "-o", "addr", "show")
    for _ in range(100):
        net = ipaddress.ip_network(f"10.231.{random.randint(1, 254)}.0/24")
        if f" {str(net.network_address)[:-1]}" not in used:
            return net
    raise RuntimeError("no free /24 in 10.231.0.0/16")


@dataclass
class NetHost:
    """A worker host: its engine (in a network namespace of its own) and its link."""

    engine: hosts.Engine
    subnet: ipaddress.IPv4Network
    index: int

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def main_address(self) -> str:
        """The main namespace's end: where this host finds every service."""
        return str(self.subnet.network_address + 4 * self.index + 1)

    @property
    def address(self) -> str:
        return str(self.subnet.network_address + 4 * self.index + 2)

    @property
    def main_link(self) -> str:
        # Interface names are at most 15 characters; the third octet keeps grids apart.
        return f"rg{self.subnet.network_address.packed[2]}{self.name}m"

    @property
    def pid(self) -> int:
        pid = self.engine.pid()
        if pid is None:
            raise RuntimeError(f"engine {self.name} is not running")
        return pid

    def connect(self) -> None:
        """The veth pair: its host end moved into the engine's network namespace."""
        host_link = self.main_link[:-1] + "h"
        _ip("link", "add", self.main_link, "type", "veth", "peer", "name", host_link)
        _ip("link", "set", host_link, "netns", str(self.pid))
        _ip("addr", "add", f"{self.main_address}/30", "dev", self.main_link)
        _ip("link", "set", self.main_link, "up")
        _ip("link", "set", "lo", "up", pid=self.pid)
        _ip("addr", "add", f"{self.address}/30", "dev", host_link, pid=self.pid)
        _ip("link", "set", host_link, "up", pid=self.pid)

    def link(self, up: bool) -> None:
        """Pull (or plug back) the host's cable: the main end goes down, packets are lost."""
        _ip("link", "set", self.main_link, "up" if up else "down")

    def disconnect(self) -> None:
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.main_link)  # both ends go

    def interfaces(self) -> list[str]:
        return [
            line.split()[0].split("@")[0]
            for line in _ip("-o", "-br", "link", pid=self.pid).splitlines()
        ]

    def routes(self) -> list[str]:
        return _ip("route", pid=self.pid).splitlines()

    def command(self, command: list[str]) -> list[str]:
        """``command`` on this host: in its engine's mount and network namespaces."""
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *command]


class Forwarder:
    """TCP forwarding from ``(address, port)`` listeners to ``127.0.0.1:target`` services,
    a thread per listener and two per connection (a handful of hosts, a few connections each).
    A context manager: on exit every listener and connection is closed."""

    def __init__(self, routes: list[tuple[str, int, int]]):
        self.routes = routes
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Forwarder:
        for address, port, target in self.routes:
            listener = socket.create_server((address, port), reuse_port=False)
            self._track(listener)
            threading.Thread(target=self._accept, args=(listener, target), daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._closed = True
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self, listener: socket.socket, target: int) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._track(client)
            self._track(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


# --- the product, as an operator installs it ------------------------------------------------


def build_wheel(root: Path) -> Path:
    """The wheel, built from a copy of the tree (so no build/ folder of a developer's leaks
    into it, and none is left in the checkout)."""
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(root / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.rmtree(source)
    (wheel,) = (root / "dist").glob("rgrid-*.whl")
    return wheel


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A new virtualenv holding the wheel and its dependencies (from uv's cache when it has
    them, else from the package index), as `uv pip install rgrid.whl` on a new host; returns
    its bin folder. Nothing of the checkout is on its path."""
    uv = str(Path(sys.executable).parent / "uv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True, env=env)
    install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)]
    if subprocess.run([*install, "--offline"], env=env, capture_output=True).returncode != 0:
        subprocess.run(install, check=True, env=env, capture_output=True, timeout=600)
    return venv / "bin"


def render_env_file(template: Path, values: dict[str, str], out: Path) -> Path:
    """``template`` (deploy/rgrid.env) with ``values`` set: each named line, commented out or
    not, gets its value; required lines not named are dropped (nothing placeholder stays)."""
    lines, seen = [], set()
    for line in template.read_text().splitlines():
        key = line.lstrip("#").partition("=")[0].strip()
        if "=" in line and key.startswith(("RGRID_", "AWS_", "DOCKER_", "PROMETHEUS_")):
            if key in values:
                lines.append(f"{key}={values[key]}")
                seen.add(key)
                continue
            if not line.startswith("#"):
                continue
        lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items() if k not in seen]
    out.write_text("\n".join(lines) + "\n")
    out.chmod(0o600)
    return out


def wait_for(what: str, done, timeout_s: float, every_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


# --- a deployed grid: worker hosts, the API and beat, all from the wheel -------------------

TEMPLATE = REPO / "deploy" / "rgrid.env"


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
    nets: dict[str, NetHost]
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
            **read_env_file(self.env_files[name]),
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


@contextlib.contextmanager
def deployed(
    root: Path,
    names: tuple[str, ...],
    services: dict[str, str],
    common: dict[str, str],
    template: Path = TEMPLATE,
) -> Iterator[Grid]:
    """Worker hosts ``names`` deployed from the wheel (built from this tree) in namespaces of
    their own, with the API and beat in the main namespace. ``services``: the database,
    Redis and S3 URLs on loopback (each host gets them on its link's address); ``common``:
    the rest of every host's env file (``RGRID_QUEUE`` among them)."""
    timings: dict[str, float] = {}
    bin_dir = installed_wheel(root, timings)
    queue = common["RGRID_QUEUE"]
    api_port = free_port()
    logs = root / "logs"
    logs.mkdir()
    engines = [hosts.Engine(name, root / "hosts") for name in names]
    subnet = free_subnet()
    nets = {e.name: NetHost(e, subnet, i) for i, e in enumerate(engines)}
    processes: list[Supervised] = []
    started = time.monotonic()
    with hosts.Engines(engines, runtime_images(), remove=True):
        timings["engines started, runtime image loaded"] = time.monotonic() - started
        try:
            for net in nets.values():
                net.connect()
            ports = [*(_port(u) for u in services.values()), api_port]
            with Forwarder([(n.main_address, p, p) for n in nets.values() for p in ports]):
                main_file = render_env_file(template, {**services, **common}, root / "main.env")
                start_main_roles(root, bin_dir, main_file, api_port, processes)
                app = queueing.create_celery_app()
                app.conf.task_default_queue = queue
                grid = Grid(
                    root=root,
                    bin=bin_dir,
                    queue=queue,
                    nets=nets,
                    env_files=host_env_files(nets, template, services, common, api_port),
                    workers={},
                    registry=HostRegistry(redis_client(services["RGRID_REDIS_URL"]), queue),
                    app=app,
                    api_port=api_port,
                    timings=timings,
                )
                start_workers(grid, processes)
                wait_for(
                    "both hosts' heartbeats",
                    lambda: all(grid.registry.alive(n) for n in names),
                    90,
                )
                yield grid
        finally:
            for process in reversed(processes):
                process.stop()
            for net in nets.values():
                net.disconnect()
            forget_queue(services["RGRID_REDIS_URL"], queue)


def installed_wheel(root: Path, timings: dict[str, float]) -> Path:
    """The wheel built from this tree and installed into a virtualenv of its own (what every
    host runs); the seconds each took go into ``timings``. Returns the virtualenv's bin."""
    started = time.monotonic()
    wheel = build_wheel(root)
    timings["wheel build"] = time.monotonic() - started
    started = time.monotonic()
    bin_dir = install_wheel(wheel, root / "venv")
    timings["wheel install"] = time.monotonic() - started
    return bin_dir


def start_main_roles(
    root: Path, bin_dir: Path, env_file: Path, api_port: int, processes: list[Supervised]
) -> None:
    """The main namespace's roles, the API and beat on loopback, configured by ``env_file``
    alone, each added to ``processes`` as it starts (the caller stops them, even when the API
    never answers); returns once the API answers."""
    logs = root / "logs"
    main_env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "PROMETHEUS_MULTIPROC_DIR": str(logs),
        **read_env_file(env_file),
    }
    python = str(bin_dir / "python")
    api = [python, "-m", "gunicorn", "--bind", f"127.0.0.1:{api_port}"]
    api += ["--workers", "1", "--threads", "4", "rgrid.api:create_app()"]
    processes.append(Supervised(api, main_env, logs / "api.log", root).start())
    beat = [python, "-m", "celery", "-A", "workers.celery_app", "beat"]
    beat += ["--schedule", str(root / "beat-schedule")]
    processes.append(Supervised(beat, main_env, logs / "beat.log", root).start())
    wait_healthy(f"http://127.0.0.1:{api_port}", logs / "api.log")


def host_env_files(
    nets: dict[str, NetHost],
    template: Path,
    services: dict[str, str],
    common: dict[str, str],
    api_port: int,
) -> dict[str, Path]:
    """Each host's env file, its whole configuration: the services and the API at its link's
    main address, its own name, data folder, Docker engine and metrics folder."""
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
        env_files[name] = render_env_file(template, values, net.engine.dir / "rgrid.env")
    return env_files


def start_workers(grid: Grid, processes: list[Supervised]) -> None:
    """A Celery worker per host, in the host's namespace with the host's env file alone, each
    added to ``processes`` as it starts."""
    python = str(grid.bin / "python")
    logs = grid.root / "logs"
    for name, net in grid.nets.items():
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


def forget_queue(redis_url: str, queue: str) -> None:
    """The grid's queue and its bindings gone from the shared Redis."""
    client = redis_client(redis_url)
    for pattern in (cache_keys.deployment_keys_pattern(queue), f"_kombu.binding*{queue}*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
