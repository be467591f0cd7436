"""The sandbox a script runs in: a pre-started container, claimed once, then gone.

A sandbox is started before any execution needs it (see ``rgrid/host/pool.py``) with every limit
the design (docs/design.md) asks for: no network, a non-root user, a read-only root, writable
``/work``, ``/tmp`` and home, memory/CPU/PID limits, no capabilities, no new privileges. Its
PID 1 is a small supervisor (``SUPERVISOR``) that waits on stdin for one job. An execution
claims it, writes the script and inputs into its work folder, sends the job line over an
attach socket and reads the output back on the same socket; the supervisor runs the script
once, enforces the deadline
itself (so it holds when the runner or the whole worker dies), kills whatever the script left
behind, writes the exit status and exits. ``auto_remove`` then deletes the container: nobody
has to remember to. An unclaimed sandbox exits after its idle timeout the same way.

Why this shape (measured on a 2-core host, Docker 20.10 on fuse-overlayfs): ``docker run`` of
a hello script costs 0.36 s, nearly all of it creating and starting the container; a claim
(``rename``, 4 ms) plus the attach and the script's own interpreter start cost about 0.1 s.
``/work`` is a bind mount of a folder on the worker host, so inputs are written and outputs
read as plain files: ``put_archive`` and ``get_archive`` cost ~0.1 s each, because the engine
re-executes itself to unpack each archive in a chroot. That folder is on a filesystem of the
sandbox's own (a loop-mounted ext4 image of the disk limit, see ``_mount_disk``), so the
kernel refuses the write past the limit and the host disk is never filled.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import Mount
from docker.utils.socket import frames_iter

from rgrid.core.config import Settings
from rgrid.core.units import human_limit, parse_bytes
from rgrid.host.docker_engine import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.host.runtimes import CONTAINER_HOME, WORK_DIR
from rgrid.store.channels import StdinSource
from rgrid.store.inputs import OUTPUTS_DIR

#: Where an environment's installed dependency set is mounted, read-only, on the import path.
DEPS_MOUNT = "/opt/rgrid/deps"
#: The supervisor's own folder (exit status), outside ``/work`` so a script's listing of its
#: working directory shows only what the user put there.
META_MOUNT = "/run/rgrid"
STATUS_FILE = "status.json"
#: The script's output as the supervisor saw it (``read_kept_output``), beside the status:
#: on the sandbox's own filesystem, so it is bounded by its disk limit, and on the worker
#: host, so a runner that dies mid-run loses none of it.
OUTPUT_FILE = "output.bin"
#: In the sandbox's host folder (out of the container's sight): which execution claimed it,
#: so a redelivered run step finds its folder after the container has removed itself.
CLAIM_FILE = "execution"

#: Everything a script can write, each with a hard size limit the kernel enforces.
WRITABLE = (WORK_DIR, "/tmp", CONTAINER_HOME)

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
import fcntl, json, os, select, signal, struct, sys, time
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
# The status file is written in place over bytes allocated now: the script shares this
# filesystem and may fill it, after which no new block could be had.
status_fd = os.open(job["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(status_fd, b" " * 512)
# The script's output, kept beside the status as frames (stream, length, bytes) up to a cap:
# what a runner that died mid-run never read is here for the one that re-attaches.
kept = {"fd": os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        "room": job["output_max"], "all": True}
def keep(stream, data):
    if kept["fd"] is None:
        return
    piece = data[: kept["room"]]
    try:
        if piece:
            os.write(kept["fd"], struct.pack(">BI", stream, len(piece)) + piece)
    except OSError:
        piece = b""
    kept["room"] -= len(piece)
    if len(piece) < len(data):
        kept["all"] = False
        os.close(kept["fd"])
        kept["fd"] = None
out_r, out_w = os.pipe()
err_r, err_w = os.pipe()
for fd in (out_r, err_r):
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer, larger copies of a flood
    except OSError:
        pass
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.signal(signal.SIGCHLD, lambda *_: None)
signal.set_wakeup_fd(wake_w)
open(job["status"] + ".started", "w").close()
pid = os.fork()
if pid == 0:
    os.setsid()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (out_r, out_w, err_r, err_w, wake_r, wake_w, kept["fd"], status_fd):
        if fd is not None and fd > 2:
            os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(job["cwd"])
    os.execvpe(job["argv"][0], job["argv"], job["env"])
os.close(out_w)
os.close(err_w)
streams = {out_r: 1, err_r: 2}
deadline = time.monotonic() + job["timeout"]
timed_out = False
code = None
def write_all(fd, data):
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return
# Until the script has exited and every process holding its output is gone (killed once
# it has exited): its output is copied to the container's streams and kept.
while code is None or streams:
    if code is None:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(wait_status)
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            continue
    left = deadline - time.monotonic()
    if left <= 0 and code is None and not timed_out:
        timed_out = True
        os.killpg(pid, signal.SIGKILL)
        continue
    try:
        ready = select.select([*streams, wake_r], [], [], max(left, 0.05) if code is None else 1)[0]
    except InterruptedError:
        continue
    for fd in ready:
        if fd == wake_r:
            os.read(wake_r, 512)
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            os.close(fd)
            del streams[fd]
            continue
        write_all(streams[fd], data)
        keep(streams[fd], data)
if timed_out:
    code = -signal.SIGKILL
code = code if code >= 0 else 128 - code
oom = oom_kills() > ooms
def full(path):
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    margin = max(job["full_below"] // fs.f_frsize, fs.f_blocks // 500)
    return fs.f_bavail < margin or (fs.f_files and not fs.f_favail)
filled = [path for path in job["writable"] if full(path)]
status = json.dumps(
    {"exit_code": code, "timed_out": timed_out, "oom_killed": oom, "full": filled,
     "output_kept": kept["all"]}
)
os.pwrite(status_fd, status.encode()[:512].ljust(512), 0)
os.close(status_fd)
# Every process of the script is gone and the status is written: say so on both streams, so
# the runner stops reading now instead of when the engine has wound the container down.
end = job["end"].encode()
os.write(1, end)
os.write(2, end)
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
    #: Everything the script can write in ``/work`` (inputs and outputs included).
    disk: str
    max_output_bytes: int
    max_output_files: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            user=settings.container_user,
            memory=settings.memory_limit,
            cpus=settings.cpu_limit,
            pids=settings.pids_limit,
            tmp_size=settings.tmp_size,
            home_size=settings.home_size,
            disk=settings.disk_limit,
            max_output_bytes=settings.max_output_bytes,
            max_output_files=settings.max_output_files,
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
    def disk(self) -> Path:
        """The sandbox's own filesystem (see ``_mount_disk``), holding ``work`` and ``meta``."""
        return self.host_dir / DISK_DIR

    @property
    def work(self) -> Path:
        return self.disk / "work"

    @property
    def meta(self) -> Path:
        return self.disk / "meta"


@dataclass
class RunResult:
    exit_code: int | None
    timed_out: bool
    run_s: float
    notes: list[str] = field(default_factory=list)
    #: The kernel killed a process of the script at the sandbox's memory limit.
    oom_killed: bool = False
    #: The sandbox's writable places (``WRITABLE``) the script filled to their limit.
    full: list[str] = field(default_factory=list)
    #: The supervisor said it was done (its end marker): the container is exiting by itself.
    ended: bool = False
    #: The supervisor kept all of the output (``OUTPUT_FILE``): under its cap, disk not full.
    output_kept: bool = True


class OutputLimitExceeded(Exception):
    pass


#: Below this much free space a sandbox filesystem counts as full (ext4 refuses a write with
#: a few hundred KiB still free, reserved for its own delayed allocation).
FULL_BELOW_BYTES = 2 * 1024**2
#: The folder under a sandbox's host folder where its filesystem is mounted, and the image.
DISK_DIR = "fs"
DISK_IMAGE = "disk.img"


def _mount_disk(host_dir: Path, size: int) -> None:
    """Give the sandbox a filesystem of its own, ``size`` bytes, so that the kernel refuses
    the write that would go over the limit (fuse-overlayfs, under Docker here, has no
    quotas, and a folder on the host disk has no limit at all): a sparse file formatted
    ext4 and loop-mounted under the host folder. ``/work`` and the supervisor's folder are
    bind-mounted from it; ``/tmp`` and home are size-limited tmpfs, charged to the memory
    cgroup. No journal (the filesystem lives for one run) and no inode-table zeroing, so the
    sparse file holds only what is written. Measured here: mkfs 7 ms, mount 7 ms, umount
    4 ms, against ~360 ms for the container's own create and start; done when the sandbox
    is started for the pool, off the user's path."""
    image = host_dir / DISK_IMAGE
    with open(image, "wb") as fh:
        fh.truncate(size)
    os.chmod(image, 0o600)
    _command(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)])
    options = "loop,nosuid,nodev,noatime,noinit_itable"
    _command(["mount", "-t", "ext4", "-o", options, str(image), str(host_dir / DISK_DIR)])


def release_disk(host_dir: Path) -> None:
    """Unmount a sandbox's filesystem. Lazily: the container may still be exiting with it
    mounted in its own namespace; the kernel frees the loop device (autoclear) and the
    image's blocks when the last user lets go, and the image file goes with the folder."""
    disk = host_dir / DISK_DIR
    if os.path.ismount(disk) and _libc().umount2(os.fsencode(disk), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount failed: {os.strerror(ctypes.get_errno())}")


#: umount2(2)'s flag for ``umount -l``.
MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, for umount2: a system call instead of an ``umount`` process (~10 ms of
    fork and exec on every sandbox's way out)."""
    return ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline, backslash in octal)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def sandbox_disks() -> list[Path]:
    """The host folders of every sandbox filesystem mounted on this host, whichever
    installation made it: a mount named ``DISK_DIR`` whose loop device is backed by the
    ``DISK_IMAGE`` beside it."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, source = before.split(), after.split()
        if len(fields) < 5 or len(source) < 2 or not source[1].startswith("/dev/loop"):
            continue
        target = Path(_unescape(fields[4]))
        if target.name != DISK_DIR:
            continue
        backing = Path("/sys/block", Path(source[1]).name, "loop", "backing_file")
        try:
            image = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if image == str(target.parent / DISK_IMAGE):
            found.append(target.parent)
    return found


def _command(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{argv[0]} failed: {result.stderr.strip() or result.returncode}")


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


def _host_folders(root: Path, name: str, uid: int, gid: int, disk_bytes: int) -> Path:
    """The sandbox's host folder. A worker running as root (every server worker) gives it a
    filesystem of its own; the embedded default on a user's machine, which cannot mount,
    writes to plain folders on the user's own disk."""
    host_dir = root / name
    (host_dir / DISK_DIR).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            _mount_disk(host_dir, disk_bytes)
        except BaseException:
            remove_folder(host_dir)
            raise
    for sub in ("work", "meta"):
        (host_dir / DISK_DIR / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(host_dir / DISK_DIR / sub, uid, gid)
    return host_dir


def remove_folder(host_dir: Path) -> None:
    """A sandbox's host folder, its filesystem and image: gone."""
    with contextlib.suppress(OSError):
        release_disk(host_dir)
    shutil.rmtree(host_dir, ignore_errors=True)


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
    host_dir = _host_folders(root, name, uid, gid, parse_bytes(limits.disk))
    mounts = [
        Mount(WORK_DIR, str(host_dir / DISK_DIR / "work"), type="bind"),
        Mount(META_MOUNT, str(host_dir / DISK_DIR / "meta"), type="bind"),
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
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_container(name, force=True)
        remove_folder(host_dir)
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


#: Thread pools that size themselves by the host's cores, not by the container's CPU quota.
THREAD_COUNT_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def thread_environment(cpus: float) -> dict[str, str]:
    """Thread counts that fit a sandbox of ``cpus`` CPUs. OpenBLAS (numpy's) starts one
    thread per host core at import; under a one-CPU quota on two cores they were throttled,
    and ``import numpy`` took 0.13 s instead of 0.09 s. A script that sets them itself
    (``--env``) keeps its own values."""
    count = str(max(1, math.floor(cpus)))
    return dict.fromkeys(THREAD_COUNT_VARIABLES, count)


def _exec_environment(
    env: Environment, extra: dict[str, str], cpus: float | None = None
) -> dict[str, str]:
    values = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": CONTAINER_HOME,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if cpus is not None:
        values.update(thread_environment(cpus))
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
    cpus: float | None = None,
    keep_output_bytes: int = 64 * 1024**2,
) -> RunResult:
    """Send the job to a claimed sandbox and stream its output until it ends.

    The supervisor inside enforces ``timeout_s``; the runner kills the container itself only
    if the supervisor has not ended it ``KILL_GRACE_S`` later. ``cpus``: the sandbox's CPU
    limit, which thread pools are told (``thread_environment``). ``keep_output_bytes``: how
    much of the output the supervisor keeps in the sandbox's folder (``read_kept_output``)."""
    job = {
        "argv": argv,
        "env": _exec_environment(env, env_vars or {}, cpus),
        "cwd": WORK_DIR,
        "timeout": timeout_s,
        "status": f"{META_MOUNT}/{STATUS_FILE}",
        "output": f"{META_MOUNT}/{OUTPUT_FILE}",
        "output_max": keep_output_bytes,
        # Filesystems the script can write, reported back if it filled one: /work only when
        # it is the sandbox's own (a plain folder on the host disk measures the host's).
        "writable": [p for p in WRITABLE if p != WORK_DIR or os.path.ismount(box.disk)],
        "full_below": FULL_BELOW_BYTES,
        # Written by the supervisor on stdout and stderr once the script is over (see
        # ``EndMarker``); random per job, so a script cannot end its own output early by
        # guessing it, and printing it could only cut the script's own log short.
        "end": END_PREFIX + secrets.token_hex(8),
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

    ends = {1: EndMarker(job["end"]), 2: EndMarker(job["end"])}
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
            if stream not in decoders:
                continue
            if text := decoders[stream].decode(ends[stream].feed(data)):
                on_output(names[stream], text)
            if all(end.seen for end in ends.values()):
                break  # the supervisor is done; its container's exit is not waited for
        for stream, decoder in decoders.items():
            if tail := decoder.decode(ends[stream].flush(), final=True):
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
    if status is None and _filled_on_host(box):
        # The supervisor died (the memory limit) after the script filled /work: the limit
        # the script hit first is the one to name.
        return RunResult(exit_code=137, timed_out=False, run_s=run_s, full=[WORK_DIR])
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
    full = status.get("full")
    return RunResult(
        exit_code=None if status["timed_out"] else status["exit_code"],
        timed_out=bool(status["timed_out"]),
        run_s=run_s,
        oom_killed=bool(status.get("oom_killed")),
        full=[p for p in full if p in WRITABLE] if isinstance(full, list) else [],
        ended=all(end.seen for end in ends.values()),
    )


def _filled_on_host(box: Box) -> bool:
    """Whether the sandbox's own filesystem is full, as the supervisor would judge it."""
    if not os.path.ismount(box.disk):
        return False
    fs = os.statvfs(box.disk)
    margin = max(FULL_BELOW_BYTES // fs.f_frsize, fs.f_blocks // 500)
    return fs.f_bavail < margin or bool(fs.f_files and not fs.f_favail)


#: How the supervisor's end-of-run marker starts: a NUL, which text output does not end with,
#: so nothing but the marker itself is ever held back (see ``EndMarker``).
END_PREFIX = "\x00rgrid-end-"


class EndMarker:
    """Finds the supervisor's end marker at the end of one stream. Bytes that could be the
    start of the marker are held back until the next frame tells whether they are."""

    def __init__(self, marker: str):
        self.marker = marker.encode()
        self.held = b""
        self.seen = False

    def feed(self, data: bytes) -> bytes:
        if self.seen:
            return b""  # nothing follows the marker
        data = self.held + data
        self.held = b""
        at = data.find(self.marker)
        if at >= 0:
            self.seen = True
            return data[:at]
        for size in range(min(len(self.marker) - 1, len(data)), 0, -1):
            if self.marker.startswith(data[-size:]):
                self.held = data[-size:]
                return data[:-size]
        return data

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return held


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


#: Files read (and hashed) at once when outputs are collected: each small file costs a few
#: system calls, which threads overlap (10,000 outputs of 1 KiB).
COLLECT_THREADS = 8


def collect_outputs(
    box: Box,
    limits: Limits,
    notes: list[str],
    keep: dict[str, bytes] | None = None,
    keep_at_most: int = 0,
    keep_bytes: int = 0,
) -> list[dict]:
    """Every regular file under ``/work/outputs``: relative path, size, sha256.

    Runs on the host after the container is gone, so nothing can change the folder while it is
    read; links are reported and never followed (one could point anywhere on the host). The
    limits on their count and total size are checked on the listing alone, before any file is
    read, so a run over either is refused at once (5,000 files used to take minutes).
    ``keep``: filled with the bytes of files of at most ``keep_at_most`` bytes, up to
    ``keep_bytes`` in all, by relative path, so that storing them (packed) reads none again."""
    root = box.work / OUTPUTS_DIR
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            notes.append("the script replaced /work/outputs; no outputs collected")
            return []
    except FileNotFoundError:
        notes.append("the script removed /work/outputs; no outputs collected")
        return []
    found: list[tuple[str, str, int]] = []
    total = 0
    top = str(root)
    # Strings, not Path objects: 10,000 outputs are 10,000 of each step below.
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        prefix = "" if folder == top else os.path.relpath(folder, top).replace(os.sep, "/") + "/"
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            relpath = prefix + name
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                notes.append(f"skipped outputs/{relpath}: not a regular file (links not followed)")
                continue
            total += info.st_size
            if total > limits.max_output_bytes:
                raise OutputLimitExceeded(
                    f"output limit {human_limit(limits.max_output_bytes)} reached "
                    f"(at outputs/{relpath})"
                )
            if len(found) >= limits.max_output_files:
                raise OutputLimitExceeded(
                    f"output file limit reached: more than {limits.max_output_files} files "
                    "in /work/outputs"
                )
            found.append((relpath, path, info.st_size))
    kept_total = 0
    if keep is not None:
        small = [size for _, _, size in found if size <= keep_at_most]
        kept_total = sum(small)
        if kept_total > keep_bytes:
            keep = None  # too much to hold: storing reads the files again

    def one(item: tuple[str, str, int]) -> dict:
        relpath, path, size = item
        digest = hashlib.sha256()
        held = keep is not None and size <= keep_at_most
        parts = []
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while chunk := os.read(fd, 1024 * 1024):
                digest.update(chunk)
                if held:
                    parts.append(chunk)
        finally:
            os.close(fd)
        if held:
            keep[relpath] = b"".join(parts)  # type: ignore[index]
        return {"path": relpath, "size": size, "sha256": digest.hexdigest()}

    if len(found) < 2 * COLLECT_THREADS:
        return [one(item) for item in found]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(COLLECT_THREADS, thread_name_prefix="rgrid-collect") as pool:
        return list(pool.map(one, found, chunksize=64))


def output_path(box: Box, relpath: str) -> Path:
    return box.work / OUTPUTS_DIR / relpath


def kill(client: docker.DockerClient, box: Box) -> None:
    """Stop the sandbox now (it removes itself); its host folder stays until ``discard``. A
    paused one cannot be killed: it is unpaused first."""
    if not box.container_id:
        return  # found by its folder: its container is gone
    try:
        client.api.kill(box.container_id)
    except docker.errors.APIError as exc:
        if "paused" not in str(exc).lower():
            return  # already gone, or exiting
        with contextlib.suppress(docker.errors.APIError):
            client.api.unpause(box.container_id)
            client.api.kill(box.container_id)


def discard(client: docker.DockerClient, box: Box, *, ended: bool = False) -> None:
    """End the sandbox (it removes itself) and delete its host folder and filesystem.
    ``ended``: its supervisor said it is done and is exiting, so it is not killed (the engine
    answers a kill of an exiting container only once it has stopped: ~37 ms here)."""
    if not ended:
        kill(client, box)
    remove_folder(box.host_dir)


def execution_labels(execution_id: str, timeout_s: float) -> dict[str, str]:
    """For a sandbox started for one execution (no warm one was free)."""
    return {
        EXECUTION_LABEL: execution_id,
        DEADLINE_LABEL: str(int(time.time() + timeout_s + KILL_GRACE_S + 60)),
    }


# --- a runner that died mid-run: the next one re-attaches ------------------------------------


def mark_claimed(box: Box, execution_id: str) -> None:
    """Record in the sandbox's host folder which execution claimed it. The container removes
    itself when the script ends; the folder (status, outputs, kept output) stays until the
    result is published, and this is how a redelivered run step finds it."""
    (box.host_dir / CLAIM_FILE).write_text(execution_id)


#: How long the folder of a claimed sandbox whose container is gone is kept for a runner
#: that may still come back for its result (a redelivered run step: seconds; one re-sent
#: by the lease sweep: a lease or two).
RESULT_KEEP_S = 900.0


def holds_result(host_dir: Path, keep_s: float = RESULT_KEEP_S) -> bool:
    """Whether a gone sandbox's folder may still be wanted by a runner coming back for it:
    claimed by an execution, and claimed or ended less than ``keep_s`` ago."""
    stamps = [_mtime(host_dir / CLAIM_FILE), _mtime(host_dir / DISK_DIR / "meta" / STATUS_FILE)]
    if stamps[0] is None:
        return False
    return time.time() - max(t for t in stamps if t is not None) < keep_s


def claimed_by(host_dir: Path) -> str | None:
    try:
        return (host_dir / CLAIM_FILE).read_text().strip() or None
    except OSError:
        return None


def find_claimed(client: docker.DockerClient, root: Path, execution_id: str) -> Box | None:
    """The sandbox an earlier attempt of this execution claimed, alive or not: by its
    container's name while it exists, else by the claim file in its host folder."""
    name = f"{RUN_NAME_PREFIX}{execution_id}"
    try:
        info = client.api.inspect_container(name)
        labels = info["Config"]["Labels"] or {}
        if HOST_DIR_LABEL in labels:
            return Box(name, info["Id"], Path(labels[HOST_DIR_LABEL]))
    except docker.errors.NotFound:
        pass
    for folder in root.iterdir() if root.is_dir() else []:
        if claimed_by(folder) == execution_id:
            return Box(name, "", folder)
    return None


#: A frame of the kept output: its stream (1 or 2) and length, then that many bytes.
_FRAME = struct.Struct(">BI")


class KeptOutput:
    """Reads the output the supervisor kept (``OUTPUT_FILE``), as it grows, decoded per stream
    like the live stream is. The file is the script's to write too (it runs as the same
    user), so it is opened without following links and read only as far as it is well
    formed: a script can spoil only its own log."""

    NAMES = {1: "stdout", 2: "stderr"}

    def __init__(self, box: Box):
        self.path = box.meta / OUTPUT_FILE
        self.position = 0
        self.broken = False
        self.decoders = {
            number: codecs.getincrementaldecoder("utf-8")(errors="replace") for number in self.NAMES
        }

    def read(self) -> list[tuple[str, str]]:
        """The (stream, text) pieces written since the last read."""
        if self.broken:
            return []
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return []
        pieces = []
        with os.fdopen(fd, "rb") as fh:
            fh.seek(self.position)
            while header := fh.read(_FRAME.size):
                if len(header) < _FRAME.size:
                    break
                number, size = _FRAME.unpack(header)
                if number not in self.NAMES:
                    self.broken = True
                    break
                data = fh.read(size)
                if len(data) < size:
                    break  # the supervisor is half way through writing it
                self.position += _FRAME.size + size
                if text := self.decoders[number].decode(data):
                    pieces.append((self.NAMES[number], text))
        return pieces

    def flush(self) -> list[tuple[str, str]]:
        """The last pieces, once the supervisor is done."""
        pieces = self.read()
        for number, decoder in self.decoders.items():
            if tail := decoder.decode(b"", final=True):
                pieces.append((self.NAMES[number], tail))
        return pieces


class Skipping:
    """Hands on the part of each stream's text past what was already forwarded (``seen``:
    characters per stream), so that re-reading the kept output from its start adds each
    line to the log once."""

    def __init__(self, on_output: Callable[[str, str], None], seen: dict[str, int]):
        self.on_output = on_output
        self.skip = dict(seen)

    def __call__(self, pieces: list[tuple[str, str]]) -> None:
        for stream, text in pieces:
            skip = self.skip.get(stream, 0)
            if skip >= len(text):
                self.skip[stream] = skip - len(text)
                continue
            self.skip[stream] = 0
            self.on_output(stream, text[skip:])


def _container_running(client: docker.DockerClient, box: Box) -> bool:
    if not box.container_id:
        return False
    try:
        return bool(client.api.inspect_container(box.container_id)["State"]["Running"])
    except docker.errors.NotFound:
        return False


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


#: How often a re-attached runner looks at the sandbox it waits for.
REATTACH_POLL_S = 0.2


def reattach(
    client: docker.DockerClient,
    box: Box,
    *,
    timeout_s: float,
    on_output: Callable[[str, str], None],
    seen: dict[str, int],
    stop: threading.Event | None = None,
) -> RunResult | None:
    """Follow a sandbox an earlier runner started the script in, until it ends: its output
    past ``seen`` (characters per stream already in the log) goes to ``on_output``, and its
    result comes from the status its supervisor wrote. None when the script never started
    there, or the sandbox is gone without a result (killed, or its supervisor died): the
    caller runs it anew. The deadline is the supervisor's to enforce; past it and
    ``KILL_GRACE_S`` the sandbox is killed from here, as ``run`` would. ``stop``: set to give
    up waiting (a cancel; the caller has killed the sandbox)."""
    started = _mtime(box.meta / (STATUS_FILE + ".started"))
    if started is None:
        return None
    kept = KeptOutput(box)
    forward = Skipping(on_output, seen)
    stop = stop or threading.Event()
    killed = False
    while _container_running(client, box) and _read_status(box) is None:
        forward(kept.read())
        if not killed and time.time() > started + timeout_s + KILL_GRACE_S:
            kill(client, box)
            killed = True
        if stop.wait(REATTACH_POLL_S):
            break
    status = _read_status(box)
    forward(kept.flush())
    ended = _mtime(box.meta / STATUS_FILE) or time.time()
    run_s = max(0.0, ended - started)
    if status is None:
        if killed:
            return RunResult(exit_code=None, timed_out=True, run_s=run_s)
        return None
    full = status.get("full")
    return RunResult(
        exit_code=None if status["timed_out"] else status["exit_code"],
        timed_out=bool(status["timed_out"]),
        run_s=run_s,
        oom_killed=bool(status.get("oom_killed")),
        full=[p for p in full if p in WRITABLE] if isinstance(full, list) else [],
        ended=True,
        output_kept=status.get("output_kept") is not False,
    )
