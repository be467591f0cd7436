"""Executions whose runner is gone: the lease sweep (a worker stopped renewing its lease:
its run step goes back to its host, or the execution ends lost) and the embedded default's
recovery of what a killed `rgrid run` left."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import docker
from sqlalchemy import select, update

from rgrid.core.db import session_scope
from rgrid.core.errors import RGridError
from rgrid.core.models import Execution, utcnow
from rgrid.core.statuses import TERMINAL_STATUSES, Status
from rgrid.host import sandbox_container, sandbox_reattach
from rgrid.pipeline.chain import fail

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def end_lost(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """End an execution whose runner is gone: its sandbox (if on this host) with its host
    folder and filesystem, and its row. The runner would have removed the folder; without
    this its filesystem stayed mounted until a later sweep of this data folder, which for an
    embedded user's folder may never come."""
    with contextlib.suppress(docker.errors.DockerException, RGridError, OSError):
        box = sandbox_reattach.find_claimed(ctx.docker, ctx.settings.sandboxes_dir, execution_id)
        if box is not None:
            sandbox_container.discard(ctx.docker, box)
    fail(ctx, execution_id, message)


#: How many times the lease sweep sends a lost runner's run step back to its host before it
#: gives the execution up as lost.
MAX_RUN_RESENDS = 2


def sweep_lost_workers(
    ctx: PipelineContext, resend: Callable[[str, str | None], None] | None = None
) -> list[str]:
    """Running executions whose worker stopped renewing its lease (killed, or its host died),
    within a minute rather than at the broker's visibility timeout (an hour past the hard
    time limit).

    Its sandbox runs on without it, so while its host is alive (its worker restarted under
    its supervisor, or another process there) the run step is sent back to that host's
    queue with ``resend(execution_id, host)``: it re-attaches to the sandbox, and the script
    runs once (``reattach``). That happens at most ``MAX_RUN_RESENDS`` times, and once for a
    host not seen alive; an execution past that ends ``error: worker lost`` with its sandbox
    killed, and a redelivered task then finds the row over and does nothing. Returns the
    executions ended."""
    cutoff = utcnow() - timedelta(seconds=ctx.settings.lease_s)
    with session_scope(ctx.session_factory) as session:
        lost = session.execute(
            select(Execution.id, Execution.worker, Execution.host, Execution.run_resends).where(
                Execution.status == Status.RUNNING, Execution.heartbeat_at < cutoff
            )
        ).all()
    ended = []
    for execution_id, worker, host, resends in lost:
        # A host not seen alive gets one lease of grace: its worker may be restarting (a
        # supervised worker beats again a few seconds after it starts).
        most = MAX_RUN_RESENDS if _host_alive(ctx, host) else 1
        if resend is not None and resends < most:
            if _mark_resent(ctx, execution_id, cutoff):
                ctx.note(
                    execution_id,
                    f"worker lost: {worker} stopped while running it; its sandbox is left "
                    "running and the run step goes back to its host",
                )
                resend(execution_id, host)
            continue
        end_lost(ctx, execution_id, f"worker lost: {worker} stopped while running it; run it again")
        ended.append(execution_id)
    return ended


def _host_alive(ctx: PipelineContext, host: str | None) -> bool:
    if ctx.hosts is None or host is None:
        return True
    try:
        return ctx.hosts.alive(host)
    except Exception:  # noqa: BLE001 - Redis away: no resend now; the next sweep looks again
        return False


def _mark_resent(ctx: PipelineContext, execution_id: str, cutoff) -> bool:
    """Count a resend and renew the lease for the step on its way, unless another sweep or
    the runner itself got there first (one conditional UPDATE)."""
    with session_scope(ctx.session_factory) as session:
        result = session.execute(
            update(Execution)
            .where(
                Execution.id == execution_id,
                Execution.status == Status.RUNNING,
                Execution.heartbeat_at < cutoff,
            )
            .values(heartbeat_at=utcnow(), run_resends=Execution.run_resends + 1)
        )
        return result.rowcount == 1


def _process_alive(worker: str | None, host: str) -> bool:
    prefix, _, pid = (worker or "").rpartition(":")
    if prefix != f"embedded:{host}" or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process nobody has reaped yet (a zombie) still answers signal 0.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def recover_interrupted(ctx: PipelineContext) -> list[str]:
    """The embedded default, on start: end what an earlier `rgrid run` on this machine left
    unfinished when it was killed (its sandbox, its row), so nothing waits for ever."""
    host = socket.gethostname()
    with session_scope(ctx.session_factory) as session:
        rows = session.execute(
            select(Execution.id, Execution.worker).where(
                Execution.status.not_in(TERMINAL_STATUSES),
                Execution.worker.like(f"embedded:{host}:%"),
            )
        ).all()
    ended = []
    for execution_id, worker in rows:
        if not _process_alive(worker, host):
            end_lost(ctx, execution_id, "interrupted: the rgrid process running it was killed")
            ended.append(execution_id)
    return ended
