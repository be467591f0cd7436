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
from dataclasses import dataclass
from pathlib import Path

from scripts import hosts

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


def read_env_file(path: Path) -> dict[str, str]:
    """What systemd's ``EnvironmentFile=`` makes of the file: ``KEY=VALUE`` lines, ``#``
    comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


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
