"""Running a script in a claimed sandbox: the job sent, the run followed to its result.

The job line goes over the attach socket, and the output comes back on it (see
``sandbox_streams``). The supervisor enforces the deadline; the runner holds two timers of its
own: one kills the sandbox from outside if the supervisor has not ended it ``KILL_GRACE_S``
after the deadline, the other gives the sandbox up if it never acknowledged the job
(``SandboxUnresponsive``: the script never started, so it may run elsewhere). The result comes
from the status file the supervisor wrote, or, when it wrote none, from what is known outside.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker

from rgrid.host.runtimes import CONTAINER_HOME, WORK_DIR
from rgrid.host.sandbox import (
    DEPS_MOUNT,
    JOB_ACK_S,
    KILL_GRACE_S,
    META_MOUNT,
    OUTPUT_FILE,
    STATUS_FILE,
    WRITABLE,
    Box,
    Environment,
    RunResult,
    SandboxUnresponsive,
)
from rgrid.host.sandbox_container import kill
from rgrid.host.sandbox_streams import forward_frames, pump_stdin
from rgrid.host.sandbox_supervisor import END_PREFIX, FULL_BELOW_BYTES
from rgrid.store.channels import StdinSource

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
    much of the output the supervisor keeps in the sandbox's folder (read back by
    ``sandbox_streams.KeptOutput``)."""
    job = _job(box, env, argv, timeout_s, env_vars or {}, cpus, keep_output_bytes)
    attached = _Attached.to(client, box, timeout_s)
    started = time.monotonic()
    try:
        attached.send(job, stdin)
        ended = forward_frames(attached.sock, job["end"], on_output)
    finally:
        attached.close(stdin)
    run_s = time.monotonic() - started
    if attached.unresponsive.is_set():
        raise SandboxUnresponsive(f"sandbox {box.name} did not take its job in {JOB_ACK_S:.0f}s")
    return _result(box, run_s, timeout_s, killed=attached.killed.is_set(), ended=ended)


def _job(
    box: Box,
    env: Environment,
    argv: list[str],
    timeout_s: float,
    env_vars: dict[str, str],
    cpus: float | None,
    keep_output_bytes: int,
) -> dict:
    """The job line the supervisor reads (see ``sandbox_supervisor.SUPERVISOR``)."""
    return {
        "argv": argv,
        "env": _exec_environment(env, env_vars, cpus),
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


@dataclass
class _Attached:
    """The attach socket to a claimed sandbox, and the two timers that end reading it: the
    deadline's (``killed``) and the acknowledgement's (``unresponsive``)."""

    sock: Any
    raw: socket.socket
    watchdog: threading.Timer
    ack_check: threading.Timer
    killed: threading.Event
    unresponsive: threading.Event

    @classmethod
    def to(cls, client: docker.DockerClient, box: Box, timeout_s: float) -> _Attached:
        sock = client.api.attach_socket(
            box.container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        raw: socket.socket = sock._sock  # docker-py exposes no half-close on its wrapper
        killed = threading.Event()
        unresponsive = threading.Event()

        def end_reading() -> None:
            # Ends the read below even if the engine never closes the stream.
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)

        def kill_at_deadline() -> None:
            killed.set()
            kill(client, box)
            end_reading()

        def check_acknowledged() -> None:
            if not (box.meta / (STATUS_FILE + ".started")).exists():
                unresponsive.set()
                kill(client, box)
                end_reading()

        watchdog = threading.Timer(timeout_s + KILL_GRACE_S, kill_at_deadline)
        watchdog.daemon = True
        ack_check = threading.Timer(JOB_ACK_S, check_acknowledged)
        ack_check.daemon = True
        return cls(sock, raw, watchdog, ack_check, killed, unresponsive)

    def send(self, job: dict, stdin: StdinSource | None) -> None:
        """The job line, then the piped input (or EOF), and the timers started."""
        self.raw.sendall(json.dumps(job).encode() + b"\n")
        if stdin is not None:
            threading.Thread(target=pump_stdin, args=(stdin, self.raw), daemon=True).start()
        else:
            self.raw.shutdown(socket.SHUT_WR)
        self.watchdog.start()
        self.ack_check.start()

    def close(self, stdin: StdinSource | None) -> None:
        self.watchdog.cancel()
        self.ack_check.cancel()
        if stdin is not None:
            stdin.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def _result(box: Box, run_s: float, timeout_s: float, *, killed: bool, ended: bool) -> RunResult:
    """What the run came to: the supervisor's status, or what is known without one."""
    status = read_status(box)
    if status is None and _filled_on_host(box):
        # The supervisor died (the memory limit) after the script filled /work: the limit
        # the script hit first is the one to name.
        return RunResult(exit_code=137, timed_out=False, run_s=run_s, full=[WORK_DIR])
    if killed or status is None:
        # Killed from outside (the deadline passed and the supervisor did not end it), or
        # the supervisor itself died (killed at the memory limit, or by the engine).
        timed_out = killed or run_s >= timeout_s
        # Its supervisor is the smallest process there, so the memory limit is the likely
        # cause of the latter.
        return RunResult(
            exit_code=None if timed_out else 137,
            timed_out=timed_out,
            run_s=run_s,
            oom_killed=not timed_out,
        )
    return result_from_status(status, run_s, ended=ended)


def result_from_status(
    status: dict, run_s: float, *, ended: bool, output_kept: bool = True
) -> RunResult:
    """The run's result as its supervisor's status file (``read_status``) gives it."""
    full = status.get("full")
    return RunResult(
        exit_code=None if status["timed_out"] else status["exit_code"],
        timed_out=bool(status["timed_out"]),
        run_s=run_s,
        oom_killed=bool(status.get("oom_killed")),
        full=[p for p in full if p in WRITABLE] if isinstance(full, list) else [],
        ended=ended,
        output_kept=output_kept,
    )


def _filled_on_host(box: Box) -> bool:
    """Whether the sandbox's own filesystem is full, as the supervisor would judge it."""
    if not os.path.ismount(box.disk):
        return False
    fs = os.statvfs(box.disk)
    margin = max(FULL_BELOW_BYTES // fs.f_frsize, fs.f_blocks // 500)
    return fs.f_bavail < margin or bool(fs.f_files and not fs.f_favail)


def read_status(box: Box) -> dict | None:
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
