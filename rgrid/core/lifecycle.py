"""The one writer of an execution's status: every move of an Execution row from one status
to another is made here, through ``statuses.check_transition``.

An execution moves ``queued -> building -> running`` while its steps work on it. A step that
decides how it ends records an ``outcome`` (``decide``); the store step turns the outcome into
the final status once the log is stored (``publish``). Ends that need no store step write the
final status, outcome and error at once (``finish``): an error or an execution nobody will
finish (``fail``), a cancel before it ran (``cancelled``). ``cancelled`` is written in one
place for a single row and for a batch's queued rows alike. (A row is born with its first
status: ``queued``, or ``succeeded`` when the output cache answers it; that is no move.)

Callers hold the row in their own session (the pipeline's ``execution_row``, a service's
``session_scope``); nothing here commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, update
from sqlalchemy.orm import Session

from rgrid.core.models import Execution, utcnow
from rgrid.core.statuses import Status, check_transition

#: The error a cancelled execution carries (what `rgrid status` shows).
CANCELLED_ERROR = "cancelled"


def move(execution: Execution, status: Status) -> None:
    """To ``status``, if the execution may go there from where it is (raises
    ``IllegalTransition`` otherwise)."""
    execution.status = check_transition(execution.status, status)


def start_running(execution: Execution, worker: str, host: str) -> None:
    """The run step took the execution: ``running`` on this worker, its lease begun (the
    lease sweep calls it lost once the lease is not renewed)."""
    move(execution, Status.RUNNING)
    if execution.started_at is None:
        execution.started_at = utcnow()
    execution.worker = worker
    execution.host = host
    execution.heartbeat_at = utcnow()


def renew_lease(execution: Execution) -> None:
    """Its runner (or a step moving it to another host) is alive: renew the lease of an
    execution that holds one, so the lease sweep does not call it lost."""
    if execution.heartbeat_at is not None:
        execution.heartbeat_at = utcnow()


def decide(execution: Execution, outcome: Status, error: str | None = None) -> None:
    """How the execution ends, decided by a step; the status follows in ``publish`` once its
    log is stored, so a client that sees a final status can always read the whole log."""
    execution.outcome = outcome
    if error is not None:
        execution.error = error


def publish(execution: Execution) -> None:
    """The decided outcome becomes the final status (no outcome: ``error``)."""
    move(execution, Status(execution.outcome or Status.ERROR))
    execution.finished_at = utcnow()


def finish(execution: Execution, status: Status, error: str) -> None:
    """End the execution now: final status, the same outcome, the error and the time."""
    move(execution, status)
    execution.outcome = status
    execution.error = error
    execution.finished_at = utcnow()


def fail(execution: Execution, message: str) -> None:
    """End the execution in ``error``: a step raised, it could not be queued, or nobody will
    finish it (its worker vanished, the process running it was killed, no worker ever
    finished it); ``message`` says which, and to run it again."""
    finish(execution, Status.ERROR, message)


def _cancelled(at: datetime) -> dict[str, Any]:
    """The columns ``finish`` writes for a cancel, for a bulk UPDATE of queued rows."""
    return {
        "status": Status.CANCELLED.value,
        "outcome": Status.CANCELLED.value,
        "error": CANCELLED_ERROR,
        "finished_at": at,
    }


def cancelled(execution: Execution, *, now: bool) -> None:
    """The execution is cancelled. ``now``: it had not run, and ends ``cancelled`` at once;
    otherwise its run was stopped, and ``cancelled`` is its outcome for the store step to
    publish (after its log is stored)."""
    if now:
        finish(execution, Status.CANCELLED, CANCELLED_ERROR)
    else:
        decide(execution, Status.CANCELLED, CANCELLED_ERROR)


def cancel_queued(session: Session, *where: Any) -> Sequence[Row]:
    """End every still ``queued`` execution matching ``where`` as ``cancelled``, in one
    statement; the status test is in it, so a row a step has moved on meanwhile is left to be
    cancelled as a running one. Returns (id, dispatched_at) of each row ended."""
    return session.execute(
        update(Execution)
        .where(*where, Execution.status == Status.QUEUED)
        .values(cancel_requested=True, **_cancelled(utcnow()))
        .returning(Execution.id, Execution.dispatched_at),
        execution_options={"synchronize_session": False},
    ).all()
