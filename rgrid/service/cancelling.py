"""Cancelling one execution, from the API, a client or a batch's cancel: the request is
written on the row (a running execution's worker watches it and stops the sandbox within a
second), and one that has not started running ends ``cancelled`` at once, with its log
stored. Imports no Docker code: the API cancels without loading the pipeline's steps."""

from __future__ import annotations

from rgrid.core import lifecycle, metrics
from rgrid.core.statuses import TERMINAL_STATUSES, Status
from rgrid.pipeline.logs import Surroundings, persist_logs, release, system_note
from rgrid.pipeline.rows import execution_row


def cancel(ctx: Surroundings, execution_id: str) -> tuple[str, bool]:
    """Ask for an execution to stop. One that has not started running ends ``cancelled`` at
    once; a running one is stopped by its worker's watch within a second. Returns (status,
    whether anything changed): a finished execution is left as it is."""
    with execution_row(ctx, execution_id) as execution:
        if execution.status in TERMINAL_STATUSES:
            return execution.status, False
        execution.cancel_requested = True
        if execution.status == Status.RUNNING:
            return execution.status, True
    system_note(ctx, execution_id, "cancelled before it ran")
    persist_logs(ctx, execution_id)
    with execution_row(ctx, execution_id) as execution:
        execution.log_stored = True
        if execution.status in TERMINAL_STATUSES or execution.status == Status.RUNNING:
            return execution.status, True  # the run step got there first; its watch stops it
        lifecycle.cancelled(execution, now=True)
    metrics.execution_finished(execution)
    release(ctx, execution_id)
    return Status.CANCELLED, True


def forget(ctx: Surroundings, execution_id: str) -> None:
    """A queued execution ended by a batch's cancel: drop what it had in Redis (its live log,
    its secrets and stdin), as the end of any execution does."""
    release(ctx, execution_id)
