"""A runner that died mid-run: the next one finds its sandbox and re-attaches.

A claim is recorded in the sandbox's host folder (``mark_claimed``), which outlives the
container; a redelivered run step finds the sandbox by its container's name or by that record
(``find_claimed``) and follows it to its end from the output and status the supervisor kept
(``reattach``). The folder is kept for such a runner for ``RESULT_KEEP_S`` (``holds_result``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker

from rgrid.core.cache_keys import HOST_DIR_LABEL
from rgrid.host.sandbox import (
    CLAIM_FILE,
    DISK_DIR,
    KILL_GRACE_S,
    RUN_NAME_PREFIX,
    STATUS_FILE,
    Box,
    RunResult,
)
from rgrid.host.sandbox_container import kill
from rgrid.host.sandbox_run import read_status, result_from_status
from rgrid.host.sandbox_streams import KeptOutput, Skipping


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
    while _container_running(client, box) and read_status(box) is None:
        forward(kept.read())
        if not killed and time.time() > started + timeout_s + KILL_GRACE_S:
            kill(client, box)
            killed = True
        if stop.wait(REATTACH_POLL_S):
            break
    status = read_status(box)
    forward(kept.flush())
    ended = _mtime(box.meta / STATUS_FILE) or time.time()
    run_s = max(0.0, ended - started)
    if status is None:
        if killed:
            return RunResult(exit_code=None, timed_out=True, run_s=run_s)
        return None
    return result_from_status(
        status, run_s, ended=True, output_kept=status.get("output_kept") is not False
    )
