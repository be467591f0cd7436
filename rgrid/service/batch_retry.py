"""`rgrid batch retry`: every execution of a finished batch that did not succeed run again,
as a new execution of the same batch in its place; the old one is kept, superseded."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from rgrid.core.config import Settings
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.core.models import Batch, Execution
from rgrid.core.statuses import TERMINAL_STATUSES, Status

# The batch's row lock is the batches module's own (every change to a batch takes it).
from rgrid.service.batches import RETRYABLE, Enqueue, _locked, dispatch, execution_id_for


def retry(
    session_factory: sessionmaker[Session],
    account_id: int,
    batch_id: str,
    enqueue: Enqueue,
    settings: Settings,
) -> dict[str, str]:
    """Run again every execution of the batch that did not succeed, as new executions of the
    same batch; the old ones are kept (``superseded``) but no longer counted. Successes are
    not run again. Returns each old execution's id with its new one's."""
    with session_scope(session_factory) as session:
        batch = _locked(session, account_id, batch_id)
        if batch.started_at is None:
            raise BadInput(f"batch {batch.id} has not started")
        failed = _retryable(session, batch, settings)
        renewed = {old.id: _rerun(session, batch, old) for old in failed}
        batch.cancelled_at = None
        if not failed:
            return {}
    dispatch(session_factory, batch_id, enqueue)
    return renewed


def _retryable(session: Session, batch: Batch, settings: Settings) -> list[Execution]:
    """The batch's current executions that ended otherwise than succeeded; none may still
    be unfinished, and their copies must fit within the batch's limit."""
    current = Execution.batch_id == batch.id, Execution.superseded.is_(False)
    unfinished = session.scalar(
        select(func.count())
        .select_from(Execution)
        .where(*current, Execution.status.not_in(TERMINAL_STATUSES))
    )
    if unfinished:
        raise BadInput(
            f"batch {batch.id} still has {unfinished} unfinished execution(s):"
            " wait for them or cancel the batch first"
        )
    failed = list(
        session.scalars(
            select(Execution)
            .where(*current, Execution.status.in_(RETRYABLE))
            .order_by(Execution.id)
        )
    )
    if batch.next_index + len(failed) > settings.max_batch_executions:
        raise BadInput(f"a batch may hold at most {settings.max_batch_executions} executions")
    return failed


#: What a retried execution keeps of the one it replaces.
RETRY_COPIED = (
    "account_id",
    "runtime",
    "script_name",
    "script_hash",
    "sources",
    "source_digest",
    "module",
    "dependency_source",
    "requirements",
    "inputs",
    "input_hash",
    "args",
    "timeout_s",
    "memory_bytes",
    "cpus",
    "batch_id",
    "batch_item",
)


def _rerun(session: Session, batch: Batch, old: Execution) -> str:
    """A new execution of the batch in place of ``old`` (now superseded); returns its id."""
    old.superseded = True
    new_id = execution_id_for(batch.id, batch.next_index)
    session.add(
        Execution(
            id=new_id,
            status=Status.QUEUED.value,
            refresh_deps=False,
            input_cache_hit=True,
            files_uploaded=0,
            bytes_uploaded=0,
            stdin=False,
            script_cache_hit=False,
            outputs=[],
            **{name: getattr(old, name) for name in RETRY_COPIED},
        )
    )
    batch.next_index += 1
    return new_id
