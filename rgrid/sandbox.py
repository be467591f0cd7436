"""The sandbox a script runs in: a pre-started container, claimed once, then gone.

A sandbox is started before any execution needs it (see ``rgrid/pool.py``) with every limit
DESIGN.md asks for: no network, a non-root user, a read-only root, writable ``/work``, ``/tmp``
and home, memory/CPU/PID limits, no capabilities, no new privileges. Its PID 1 is a small
supervisor (``SUPERVISOR``) that waits on stdin for one job. An execution claims it, writes the
script and inputs into its work folder, sends the job line over an attach socket and reads the
output back on the same socket; the supervisor runs the script once, enforces the deadline
itself (so it holds when the runner or the whole worker dies), kills whatever the script left
behind, writes the exit status and exits. ``auto_remove`` then deletes the container: nobody
has to remember to. An unclaimed sandbox exits after its idle timeout the same way.

Why this shape (measured on a 2-core host, Docker 20.10 on fuse-overlayfs): ``docker run`` of
a hello script costs 0.36 s, nearly all of it creating and starting the container; a claim
(``rename``, 4 ms) plus the attach and the script's own interpreter start cost about 0.1 s.
``/work`` is a bind mount of a folder on the worker host, so inputs are written and outputs
read as plain files: ``put_archive`` and ``get_archive`` cost ~0.1 s each, because the engine
re-executes itself to unpack each archive in a chroot.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import Mount
from docker.utils.socket import frames_iter

from rgrid.channels import StdinSource
from rgrid.config import Settings
from rgrid.docker_engine import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.inputs import OUTPUTS_DIR
from rgrid.runtimes import CONTAINER_HOME, WORK_DIR

#: Where an environment's installed dependency set is mounted, read-only, on the import path.
DEPS_MOUNT = "/opt/rgrid/deps"
#: The supervisor's own folder (exit status), outside ``/work`` so a script's listing of its
#: working directory shows only what the user put there.
META_MOUNT = "/run/rgrid"
STATUS_FILE = "status.json"

POOL_LABEL = "rgrid.pool"
HOST_DIR_LABEL = "rgrid.dir"
IDLE_UNTIL_LABEL = "rgrid.idle-until"
POOL_NAME_PREFIX = "rgrid-pool-"
RUN_NAME_PREFIX = "rgrid-run-"

#: How long the runner waits past the deadline for the supervisor to end the script itself
#: before it kills the container from outside.
KILL_GRACE_S = 5.0
#: How long the supervisor may take to acknowledge the job (it writes ``status.json.started``
#: before it starts the script) before the sandbox is given up as unresponsive.
JOB_ACK_S = 10.0

# PID 1 of every sandbox. Started with ``python3 -I -S`` (no site, no user paths: ~20 ms).
# SIGINT is ignored so that a script cannot end it that way; SIGTERM and SIGKILL from inside
# the container never reach PID 1 at all. The job line is read one byte at a time so that
# whatever follows it on stdin is left for the script (piped input).
SUPERVISOR = r"""
import json, os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if not select.select([0], [], [], float(sys.argv[1]))[0]:
    sys.exit(0)
line = b""
while not line.endswith(b"\n"):
    byte = os.read(0, 1)
    if not byte:
        sys.exit(0)
    line += byte
job = json.loads(line)
def oom_kills():
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as fh:
                for entry in fh:
                    name, _, value = entry.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
    return 0
ooms = oom_kills()
open(job["status"] + ".started", "w").close()
pid = os.fork()
if pid == 0:
    os.setsid()
    os.chdir(job["cwd"])
    os.execvpe(job["argv"][0], job["argv"], job["env"])
class Deadline(Exception):
    pass
def on_alarm(*_):
    raise Deadline
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, job["timeout"])
timed_out = False
try:
    _, wait_status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    code = os.waitstatus_to_exitcode(wait_status)
except Deadline:
    timed_out = True
    os.killpg(pid, signal.SIGKILL)
    code = -signal.SIGKILL
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
code = code if code >= 0 else 128 - code
oom = oom_kills() > ooms
status = json.dumps({"exit_code": code, "timed_out": timed_out, "oom_killed": oom})
with open(job["status"] + ".tmp", "w") as fh:
    fh.write(status)
os.rename(job["status"] + ".tmp", job["status"])
sys.exit(code)
"""


@dataclass(frozen=True)
class Limits:
    """What one execution may use. Part of a sandbox's pool key: a pre-started container is
    only handed to an execution whose limits it was started with. The values (and their
    defaults) are the operator's settings: build one with :meth:`from_settings`."""

    user: str
    memory: str
    cpus: float
    pids: int
    tmp_size: str
    home_size: str
    max_output_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            user=settings.container_user,
            memory=settings.memory_limit,
            cpus=settings.cpu_limit,
            pids=settings.pids_limit,
            tmp_size=settings.tmp_size,
            home_size=settings.home_size,
            max_output_bytes=settings.max_output_bytes,
        )


@dataclass(frozen=True)
class Environment:
    """What a sandbox runs: a runtime image plus, optionally, one installed dependency set (a
    folder on this host, mounted read-only)."""

    image: str
    deps_dir: Path | None = None

    def pool_key(self, limits: Limits) -> str:
        """Identifies sandboxes that are interchangeable: same image, same dependency folder,
        same limits, same supervisor (``pool.pool_key`` adds the installation)."""
        text = json.dumps(
            [self.image, str(self.deps_dir or ""), limits.__dict__, SUPERVISOR],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Box:
    """A started sandbox: its container and the host folder behind its ``/work``."""

    name: str
    container_id: str
    host_dir: Path

    @property
    def work(self) -> Path:
        return self.host_dir / "work"

    @property
    def meta(self) -> Path:
        return self.host_dir / "meta"


@dataclass
class RunResult:
    exit_code: int | None
    timed_out: bool
    run_s: float
    notes: list[str] = field(default_factory=list)
    #: The kernel killed a process of the script at the sandbox's memory limit.
    oom_killed: bool = False


class OutputLimitExceeded(Exception):
    pass


class SandboxUnresponsive(Exception):
    """The sandbox never acknowledged the job, so the script never started: it is safe to run
    it in another sandbox."""


def sandbox_uid_gid(limits: Limits) -> tuple[int, int]:
    """The ids the script runs as. A worker running as root gives the sandbox the configured
    unprivileged user; one that is not (the embedded default on a user's machine) runs it as
    itself, so that it can read and delete what the script wrote in the work folder."""
    if os.geteuid() == 0:
        uid, gid = (int(part) for part in limits.user.split(":"))
        return uid, gid
    return os.geteuid(), os.getegid()


def _host_folders(root: Path, name: str, uid: int, gid: int) -> Path:
    host_dir = root / name
    for sub in ("work", "meta"):
        (host_dir / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(host_dir / sub, uid, gid)
    return host_dir


def start_box(
    client: docker.DockerClient,
    env: Environment,
    limits: Limits,
    *,
    root: Path,
    idle_s: float,
    name: str,
    labels: dict[str, str] | None = None,
) -> Box:
    """Create and start a sandbox that waits up to ``idle_s`` for its one job."""
    uid, gid = sandbox_uid_gid(limits)
    host_dir = _host_folders(root, name, uid, gid)
    mounts = [
        Mount(WORK_DIR, str(host_dir / "work"), type="bind"),
        Mount(META_MOUNT, str(host_dir / "meta"), type="bind"),
    ]
    if env.deps_dir is not None:
        mounts.append(Mount(DEPS_MOUNT, str(env.deps_dir), type="bind", read_only=True))
    tmpfs_opts = "rw,nosuid,nodev"
    host_config = client.api.create_host_config(
        network_mode="none",
        read_only=True,
        auto_remove=True,
        tmpfs={
            "/tmp": f"{tmpfs_opts},size={limits.tmp_size},mode=1777",
            CONTAINER_HOME: f"{tmpfs_opts},size={limits.home_size},uid={uid},gid={gid},mode=0700",
        },
        mounts=mounts,
        mem_limit=limits.memory,
        memswap_limit=limits.memory,
        nano_cpus=int(limits.cpus * 1e9),
        pids_limit=limits.pids,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        init=False,
    )
    all_labels = {
        MANAGED_LABEL: "1",
        HOST_DIR_LABEL: str(host_dir),
        IDLE_UNTIL_LABEL: str(int(time.time() + idle_s)),
        **(labels or {}),
    }
    config = client.api.create_container_config(
        env.image,
        command=["python3", "-I", "-S", "-c", SUPERVISOR, str(idle_s)],
        user=f"{uid}:{gid}",
        working_dir=WORK_DIR,
        labels=all_labels,
        host_config=host_config,
        network_disabled=True,
        stdin_open=True,
    )
    # Stdin closes when the claimer detaches, so a runner that dies before sending the job
    # leaves a supervisor that sees EOF and exits. docker-py has no keyword for it.
    config["StdinOnce"] = True
    try:
        # create + start, never containers.run(): run() silently tries to pull a missing image.
        created = client.api.create_container_from_config(config, name=name)
        client.api.start(created["Id"])
    except BaseException:
        shutil.rmtree(host_dir, ignore_errors=True)
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_container(name, force=True)
        raise
    return Box(name=name, container_id=created["Id"], host_dir=host_dir)


def claim(client: docker.DockerClient, box: Box, execution_id: str) -> bool:
    """Take a pre-started sandbox for one execution, by renaming it: the loser of two
    claimers gets 404 because the old name is gone. But only when the renames come one after
    the other: two renames of one container at the same moment both succeeded here (Docker
    20.10; two threads running 40 executions handed one sandbox to two executions, which
    then ran in the same /work), so the claims of one sandbox take turns under a file lock
    in its host folder (beside ``work``, out of the container's sight)."""
    import fcntl

    lock_path = box.host_dir / "claim.lock"
    try:
        lock = open(lock_path, "a+b")  # noqa: SIM115 - held across the rename below
    except OSError:
        return False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.api.rename(box.name, f"{RUN_NAME_PREFIX}{execution_id}")
        except docker.errors.APIError:
            return False
    box.name = f"{RUN_NAME_PREFIX}{execution_id}"
    return True


def resize(client: docker.DockerClient, box: Box, memory_bytes: int, cpus: float) -> None:
    """Give a claimed sandbox the limits one run asked for (``rgrid run --memory/--cpus``):
    a warm sandbox is started with the operator's defaults, and changing a running
    container's cgroup costs ~20 ms where starting another costs ~0.4 s. docker-py's
    ``update_container`` has no ``NanoCpus``, which the container was created with (the
    engine refuses a quota beside it), so the update is posted as the docker CLI does."""
    body = {"Memory": memory_bytes, "MemorySwap": memory_bytes, "NanoCpus": int(cpus * 1e9)}
    url = client.api._url("/containers/{0}/update", box.container_id)
    client.api._result(client.api._post_json(url, data=body), True)


def place_files(box: Box, files: list[tuple[str, Path | bytes]], limits: Limits) -> None:
    """Write the script and inputs into the sandbox's ``/work`` (and an empty ``outputs/``),
    owned by the sandbox user. Inputs are copied, not linked: the script may change them, and
    the blob cache they come from must not change."""
    uid, gid = sandbox_uid_gid(limits)
    work = box.work
    for rel, source in [(OUTPUTS_DIR + "/", b""), *files]:
        target = work / rel
        parents = [p for p in Path(rel).parents if str(p) != "."]
        for parent in reversed(parents):
            folder = work / parent
            if not folder.exists():
                folder.mkdir()
                if os.geteuid() == 0:
                    os.chown(folder, uid, gid)
        if rel.endswith("/"):
            target.mkdir(exist_ok=True)
        elif isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        if os.geteuid() == 0:
            os.chown(target, uid, gid)


def _exec_environment(env: Environment, extra: dict[str, str]) -> dict[str, str]:
    values = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": CONTAINER_HOME,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if env.deps_dir is not None:
        values["PYTHONPATH"] = DEPS_MOUNT
    return {**values, **extra}


def run(
    client: docker.DockerClient,
    box: Box,
    env: Environment,
    *,
    argv: list[str],
    timeout_s: float,
    on_output: Callable[[str, str], None],
    env_vars: dict[str, str] | None = None,
    stdin: StdinSource | None = None,
) -> RunResult:
    """Send the job to a claimed sandbox and stream its output until it ends.

    The supervisor inside enforces ``timeout_s``; the runner kills the container itself only
    if the supervisor has not ended it ``KILL_GRACE_S`` later."""
    job = {
        "argv": argv,
        "env": _exec_environment(env, env_vars or {}),
        "cwd": WORK_DIR,
        "timeout": timeout_s,
        "status": f"{META_MOUNT}/{STATUS_FILE}",
    }
    sock = client.api.attach_socket(
        box.container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
    )
    raw: socket.socket = sock._sock  # docker-py exposes no half-close on its wrapper
    killed = threading.Event()

    def end_reading() -> None:
        # Ends the read below even if the engine never closes the stream.
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)

    def kill_at_deadline() -> None:
        killed.set()
        kill(client, box)
        end_reading()

    watchdog = threading.Timer(timeout_s + KILL_GRACE_S, kill_at_deadline)
    watchdog.daemon = True
    unresponsive = threading.Event()

    def check_acknowledged() -> None:
        if not (box.meta / (STATUS_FILE + ".started")).exists():
            unresponsive.set()
            kill(client, box)
            end_reading()

    ack_check = threading.Timer(JOB_ACK_S, check_acknowledged)
    ack_check.daemon = True
    started = time.monotonic()
    try:
        raw.sendall(json.dumps(job).encode() + b"\n")
        if stdin is not None:
            threading.Thread(target=_pump_stdin, args=(stdin, raw), daemon=True).start()
        else:
            raw.shutdown(socket.SHUT_WR)
        watchdog.start()
        ack_check.start()
        decoders = {
            1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            2: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        names = {1: "stdout", 2: "stderr"}
        for stream, data in frames_iter(sock, tty=False):
            if stream in decoders and (text := decoders[stream].decode(data)):
                on_output(names[stream], text)
        for stream, decoder in decoders.items():
            if tail := decoder.decode(b"", final=True):
                on_output(names[stream], tail)
    finally:
        watchdog.cancel()
        ack_check.cancel()
        if stdin is not None:
            stdin.close()
        with contextlib.suppress(OSError):
            sock.close()
    run_s = time.monotonic() - started
    if unresponsive.is_set():
        raise SandboxUnresponsive(f"sandbox {box.name} did not take its job in {JOB_ACK_S:.0f}s")
    status = _read_status(box)
    if killed.is_set() or status is None:
        # Killed from outside (the deadline passed and the supervisor did not end it), or
        # the supervisor itself died (killed at the memory limit, or by the engine).
        timed_out = killed.is_set() or run_s >= timeout_s
        # Its supervisor is the smallest process there, so the memory limit is the likely
        # cause of the latter.
        return RunResult(
            exit_code=None if timed_out else 137,
            timed_out=timed_out,
            run_s=run_s,
            oom_killed=not timed_out,
        )
    return RunResult(
        exit_code=None if status["timed_out"] else status["exit_code"],
        timed_out=bool(status["timed_out"]),
        run_s=run_s,
        oom_killed=bool(status.get("oom_killed")),
    )


def _pump_stdin(source: StdinSource, raw: socket.socket) -> None:
    """Piped input for the script, then EOF. A script that exits early closes the socket: the
    rest is dropped, as with a shell pipe."""
    with contextlib.suppress(OSError):
        while chunk := source.read(64 * 1024):
            raw.sendall(chunk)
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)


def _read_status(box: Box) -> dict | None:
    """The supervisor's exit status. Opened without following links: the script could have
    put one there, and this runs on the host."""
    try:
        fd = os.open(box.meta / STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            status = json.loads(fh.read(4096))
    except ValueError:
        return None
    if not isinstance(status, dict) or not isinstance(status.get("exit_code"), int):
        return None
    return status


def collect_outputs(box: Box, limit: int, notes: list[str]) -> list[dict]:
    """Every regular file under ``/work/outputs``: relative path, size, sha256.

    Runs on the host after the container is gone, so nothing can change the folder while it is
    read; links are reported and never followed (one could point anywhere on the host)."""
    root = box.work / OUTPUTS_DIR
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            notes.append("the script replaced /work/outputs; no outputs collected")
            return []
    except FileNotFoundError:
        notes.append("the script removed /work/outputs; no outputs collected")
        return []
    outputs: list[dict] = []
    total = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(Path(folder, d))]:
            path = Path(folder, name)
            relpath = path.relative_to(root).as_posix()
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                notes.append(f"skipped outputs/{relpath}: not a regular file (links not followed)")
                continue
            total += info.st_size
            if total > limit:
                raise OutputLimitExceeded(
                    f"outputs exceed the {limit} byte limit (at outputs/{relpath})"
                )
            digest = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    digest.update(chunk)
            outputs.append({"path": relpath, "size": info.st_size, "sha256": digest.hexdigest()})
    return outputs


def output_path(box: Box, relpath: str) -> Path:
    return box.work / OUTPUTS_DIR / relpath


def kill(client: docker.DockerClient, box: Box) -> None:
    """Stop the sandbox now (it removes itself); its host folder stays until ``discard``. A
    paused one cannot be killed: it is unpaused first."""
    try:
        client.api.kill(box.container_id)
    except docker.errors.APIError as exc:
        if "paused" not in str(exc).lower():
            return  # already gone, or exiting
        with contextlib.suppress(docker.errors.APIError):
            client.api.unpause(box.container_id)
            client.api.kill(box.container_id)


def discard(client: docker.DockerClient, box: Box) -> None:
    """End the sandbox (it removes itself) and delete its host folder."""
    kill(client, box)
    shutil.rmtree(box.host_dir, ignore_errors=True)


def execution_labels(execution_id: str, timeout_s: float) -> dict[str, str]:
    """For a sandbox started for one execution (no warm one was free)."""
    return {
        EXECUTION_LABEL: execution_id,
        DEADLINE_LABEL: str(int(time.time() + timeout_s + KILL_GRACE_S + 60)),
    }
