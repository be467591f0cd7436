"""Extra Docker engines on this machine, one per simulated worker host.

Each engine is a `dockerd` of its own: its own data root, exec root, socket, pid file and
configuration file (the machine's /etc/docker/daemon.json sets ``data-root``, which conflicts
with the flag, so each gets an empty ``{}``), no bridge and no iptables (sandboxes run with
``network_mode=none``; the engine must not touch the machine's firewall). Everything of host
``h1`` lives under ``<root>/h1``: the engine's files, and the worker's data folder
(environments, sandboxes, blob and uv caches), so per-host state really is per host.

Storage driver: overlay2. The main daemon here uses fuse-overlayfs, but a nested data root on
this machine's ext4 takes overlay2 directly (checked: ``docker info`` on the new engine says
overlay2, and containers start in ~0.3 s); fuse-overlayfs and vfs remain fallbacks for a
filesystem overlay2 refuses (vfs copies every layer: slow, but works anywhere).

The runtime image reaches a new engine without a registry by ``docker save | docker load``
from the machine's main engine (~3 s for the 168 MB image), skipped when the engine already
holds the same image id (a `make up` after `make down` keeps its data root). Chosen over a
tarball in the object store because the image is already on this machine and a copy in S3
would add 168 MB per runtime version to the store for no gain here; a real host without a
main engine beside it would load the same tarball from the store by image id instead.

Mount namespace: each dockerd starts under ``unshare --mount`` and its worker joins it
(:func:`in_namespace`). Sandboxes get loop-mounted filesystems of their own, and a sweep of
"orphaned" ones reads the whole mount table and asks its own engine which sandboxes live: on
one shared mount table, any host's (or test session's) sweep unmounted the other engines'
live sandboxes. A namespace per host is what separate machines have; it also frees every
such mount when the host's last process ends.

Who ends them: :class:`Engines` (a context manager) stops what it started; `make down` stops
them by their pid files; each dockerd runs in a session of its own (its containerd child
with it), and with ``die_with_parent`` gets SIGTERM when the process that started it dies
(PR_SET_PDEATHSIG), so a killed test session leaves no engine behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scripts.processes import stop_group

#: Tried in this order until one starts.
STORAGE_DRIVERS = ("overlay2", "fuse-overlayfs", "vfs")
START_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Engine:
    """One extra Docker engine, named like the worker host it serves (``h1``...)."""

    name: str
    root: Path

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "dockerd.pid"

    @property
    def log(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def data_dir(self) -> Path:
        """The worker's RGRID_DATA_DIR on this host."""
        return self.dir / "rgrid-data"

    def pid(self) -> int | None:
        """The dockerd's pid if it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def command(self, driver: str) -> list[str]:
        """dockerd in a mount namespace of its own (``unshare``, private propagation): as on a
        real host, the mounts made for its sandboxes (their filesystems, its overlay layers)
        are in its own mount table, where no other host's sweep of "orphaned" sandbox
        filesystems can see them, and they go away with the namespace's last process. And
        in a network namespace of its own: a dockerd started with ``--bridge none`` deletes
        any ``docker0`` interface it can see, which in the machine's own namespace is the main
        engine's bridge (measured: gone after one test run). Its sandboxes have no network
        anyway, and its worker reaches it through the socket file."""
        config = self.dir / "daemon.json"
        return [
            *("unshare", "--mount", "--net", "--propagation", "private"),
            "dockerd",
            *("--config-file", str(config)),
            *("--data-root", str(self.dir / "data")),
            *("--exec-root", str(self.dir / "exec")),
            *("-H", self.docker_host),
            *("--pidfile", str(self.pid_file)),
            *("--storage-driver", driver),
            *("--bridge", "none", "--iptables=false", "--ip-masq=false"),
        ]


def in_namespace(engine: Engine, command: list[str]) -> list[str]:
    """``command`` run in the engine's mount namespace (a host's worker must mount its
    sandboxes' filesystems where its engine sees them)."""
    pid = engine.pid()
    if pid is None:
        raise RuntimeError(f"engine {engine.name} is not running")
    return ["nsenter", "-t", str(pid), "-m", "--", *command]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux)."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def ping(engine: Engine, timeout_s: float = 3.0) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=engine.docker_host, timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


def start(engine: Engine, *, die_with_parent: bool = False) -> int:
    """Start the engine unless it runs; returns its pid. Tries each storage driver in turn
    (a data root keeps the driver it was made with, so a restart takes the first again)."""
    running = engine.pid()
    if running is not None and ping(engine):
        return running
    engine.dir.mkdir(parents=True, exist_ok=True)
    (engine.dir / "daemon.json").write_text("{}\n")
    last_error = ""
    for driver in STORAGE_DRIVERS:
        with open(engine.log, "ab") as out:
            process = subprocess.Popen(
                engine.command(driver),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if die_with_parent else None,
                start_new_session=not die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if engine.socket.exists() and ping(engine):
                engine.pid_file.write_text(f"{process.pid}\n")
                return process.pid
            time.sleep(0.2)
        stop_pid(process.pid)
        tail = engine.log.read_text(errors="replace").splitlines()[-3:]
        last_error = f"{driver}: {' '.join(tail)}"
    raise RuntimeError(f"dockerd {engine.name} did not start: {last_error}")


def stop_pid(pid: int, timeout_s: float = 20.0) -> None:
    """TERM the engine's session (dockerd and its containerd), KILL what outlives the wait.
    dockerd stops its containers on TERM."""
    stop_group(pid, timeout_s)


def kill_containers(engine: Engine) -> None:
    """Kill every container of the engine at once: its owner is ending, and dockerd would
    otherwise give each sandbox its stop timeout (10 s) on the way down."""
    import docker

    try:
        client = docker.DockerClient(base_url=engine.docker_host, timeout=10)
        for container in client.containers.list():
            try:
                container.kill()
            except Exception:  # noqa: BLE001 - gone already, or going
                pass
        client.close()
    except Exception:  # noqa: BLE001 - engine not answering: dockerd's TERM does the rest
        pass


def stop(engine: Engine, *, kill: bool = False) -> bool:
    """Stop the engine if it runs (``kill``: its containers first, without waiting for
    them); False when there was nothing to stop."""
    pid = engine.pid()
    if pid is None:
        engine.pid_file.unlink(missing_ok=True)
        return False
    if kill:
        kill_containers(engine)
    stop_pid(pid)
    engine.pid_file.unlink(missing_ok=True)
    return True


def _image_ids(docker_host: str | None, image: str) -> str | None:
    env = {**os.environ}
    env.pop("DOCKER_HOST", None)
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    found = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", image],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else None


def load_image(engine: Engine, image: str) -> bool:
    """Copy ``image`` from the machine's main engine into ``engine`` (save | load) unless it
    already has that image id; returns whether it copied. RuntimeError if the main engine
    lacks it (build it there first: `make runtime`)."""
    wanted = _image_ids(None, image)
    if wanted is None:
        raise RuntimeError(f"the main Docker engine has no image {image}: run `make runtime`")
    if _image_ids(engine.docker_host, image) == wanted:
        return False
    main_env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, env=main_env)
    loaded = subprocess.run(
        ["docker", "load", "-q"],
        stdin=save.stdout,
        env={**main_env, "DOCKER_HOST": engine.docker_host},
        capture_output=True,
        text=True,
        check=False,
    )
    assert save.stdout is not None
    save.stdout.close()
    if save.wait() != 0 or loaded.returncode != 0:
        raise RuntimeError(f"could not load {image} into {engine.name}: {loaded.stderr.strip()}")
    return True


def engines(root: Path, count: int) -> list[Engine]:
    return [Engine(f"h{i}", root) for i in range(1, count + 1)]


def status(engine: Engine) -> dict[str, object]:
    return {"name": engine.name, "pid": engine.pid(), "docker_host": engine.docker_host}


class Engines:
    """Engines started (with ``images`` loaded) on entry and stopped on exit, each tied to
    this process; ``remove``: delete their folders too."""

    def __init__(self, engines: list[Engine], images: tuple[str, ...] = (), *, remove=False):
        self.engines = engines
        self.images = images
        self.remove = remove

    def __enter__(self) -> list[Engine]:
        try:
            # Started from this thread: the death signal is tied to the thread that forks.
            for engine in self.engines:
                start(engine, die_with_parent=True)
            with ThreadPoolExecutor(max_workers=max(1, len(self.engines))) as pool:
                list(pool.map(self._load, self.engines))
        except BaseException:
            self.__exit__()
            raise
        return self.engines

    def _load(self, engine: Engine) -> None:
        for image in self.images:
            load_image(engine, image)

    def __exit__(self, *exc_info) -> None:
        def end(engine: Engine) -> None:
            stop(engine, kill=True)
            if self.remove:
                shutil.rmtree(engine.dir, ignore_errors=True)

        # Side by side: each dockerd takes seconds to stop.
        with ThreadPoolExecutor(max_workers=max(1, len(self.engines))) as pool:
            list(pool.map(end, self.engines))
