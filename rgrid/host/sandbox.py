"""What a sandbox is: a pre-started container, claimed once, then gone.

A sandbox is started before any execution needs it (see ``rgrid/host/pool.py``) with every limit
the design (docs/design.md) asks for: no network, a non-root user, a read-only root, writable
``/work``, ``/tmp`` and home, memory/CPU/PID limits, no capabilities, no new privileges. Its
PID 1 is a small supervisor (``sandbox_supervisor.SUPERVISOR``) that waits on stdin for one
job. An execution claims it, writes the script and inputs into its work folder, sends the job
line over an attach socket and reads the output back on the same socket; the supervisor runs
the script once, enforces the deadline itself (so it holds when the runner or the whole worker
dies), kills whatever the script left behind, writes the exit status and exits.
``auto_remove`` then deletes the container: nobody has to remember to. An unclaimed sandbox
exits after its idle timeout the same way.

Why this shape (measured on a 2-core host, Docker 20.10 on fuse-overlayfs): ``docker run`` of
a hello script costs 0.36 s, nearly all of it creating and starting the container; a claim
(``rename``, 4 ms) plus the attach and the script's own interpreter start cost about 0.1 s.
``/work`` is a bind mount of a folder on the worker host, so inputs are written and outputs
read as plain files: ``put_archive`` and ``get_archive`` cost ~0.1 s each, because the engine
re-executes itself to unpack each archive in a chroot. That folder is on a filesystem of the
sandbox's own (a loop-mounted ext4 image of the disk limit, see ``sandbox_fs.mount_disk``),
so the kernel refuses the write past the limit and the host disk is never filled.

This module says what a sandbox is: its limits, its environment, the paths inside it, the
started box and the result of a run. Each thing done with one has a module of its own:

- ``sandbox_supervisor``: the program that is PID 1 inside, and the job line it reads;
- ``sandbox_fs``: the host folder, and the filesystem of its own behind ``/work``;
- ``sandbox_container``: starting, claiming, resizing, killing and discarding one;
- ``sandbox_files``: the script and inputs put in, the outputs collected;
- ``sandbox_run``: sending the job and following the run to its result;
- ``sandbox_streams``: the output plumbing (end marker, piped input, the kept output);
- ``sandbox_reattach``: a runner that died mid-run, and the next one finding its sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rgrid.core.config import Settings
from rgrid.host.runtimes import CONTAINER_HOME, WORK_DIR
from rgrid.host.sandbox_supervisor import SUPERVISOR

#: Where an environment's installed dependency set is mounted, read-only, on the import path.
DEPS_MOUNT = "/opt/rgrid/deps"
#: The supervisor's own folder (exit status), outside ``/work`` so a script's listing of its
#: working directory shows only what the user put there.
META_MOUNT = "/run/rgrid"
STATUS_FILE = "status.json"
#: The script's output as the supervisor saw it (``sandbox_streams.KeptOutput``), beside the status:
#: on the sandbox's own filesystem, so it is bounded by its disk limit, and on the worker
#: host, so a runner that dies mid-run loses none of it.
OUTPUT_FILE = "output.bin"
#: In the sandbox's host folder (out of the container's sight): which execution claimed it,
#: so a redelivered run step finds its folder after the container has removed itself.
CLAIM_FILE = "execution"

#: Everything a script can write, each with a hard size limit the kernel enforces.
WRITABLE = (WORK_DIR, "/tmp", CONTAINER_HOME)

#: Container names: a warm sandbox's (its pool key's start, then random), and a claimed one's
#: (the execution's id follows), which is how a claim (a rename) and a re-attach find it.
POOL_NAME_PREFIX = "rgrid-pool-"
RUN_NAME_PREFIX = "rgrid-run-"

#: How long the runner waits past the deadline for the supervisor to end the script itself
#: before it kills the container from outside.
KILL_GRACE_S = 5.0
#: How long the supervisor may take to acknowledge the job (it writes ``status.json.started``
#: before it starts the script) before the sandbox is given up as unresponsive.
JOB_ACK_S = 10.0

#: The folder under a sandbox's host folder where its filesystem is mounted, and the image.
DISK_DIR = "fs"
DISK_IMAGE = "disk.img"


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
        """The sandbox's own filesystem (see ``sandbox_fs.mount_disk``), holding ``work``
        and ``meta``."""
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
    """The script's outputs are over their count or size limit: none is collected."""


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
