"""Per-account limits on work in progress, so that one account cannot hold every worker slot.

An execution takes a slot when it leaves ``queued`` (for ``building`` or ``running``) and
gives it back when it ends: the slots are the account's rows in those two statuses, so a
worker that dies cannot leak one (its execution is swept to ``error``). A step that finds
its account at the limit raises :class:`AccountBusy` before it does anything; the worker
then sends the step again with a countdown and frees its slot for other accounts' work (see
``workers/tasks.py``), and the execution stays ``queued``.
"""

from __future__ import annotations

import random

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rgrid.models import Execution
from rgrid.statuses import Status

#: Statuses that hold one of the account's slots.
ACTIVE = (Status.BUILDING, Status.RUNNING)
#: How long a step waits before trying again for a slot (plus up to as much again, so that
#: waiting steps do not all wake at once).
RETRY_S = 2.0
#: The advisory locks' first key: this module's, so no other lock on an account id meets it.
LOCK_SPACE = 0x5247


class AccountBusy(Exception):
    """The account has its limit of executions building or running."""

    def __init__(self, account_id: int, limit: int):
        super().__init__(f"account {account_id} has {limit} execution(s) building or running")
        self.retry_s = RETRY_S + random.uniform(0, RETRY_S)


def take_slot(session: Session, execution: Execution, limit: int) -> None:
    """Raise AccountBusy unless ``execution`` may leave ``queued`` now. Call in the same
    transaction that changes its status: on PostgreSQL a transaction-scoped advisory lock on
    the account makes the count and the change one step across workers (SQLite, the
    embedded default, serialises writers anyway). An execution already building keeps its
    slot to run."""
    if limit <= 0 or execution.status != Status.QUEUED:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(LOCK_SPACE, execution.account_id)))
    active = session.scalar(
        select(func.count())
        .select_from(Execution)
        .where(
            Execution.account_id == execution.account_id,
            Execution.status.in_([str(s) for s in ACTIVE]),
            Execution.id != execution.id,
        )
    )
    if (active or 0) >= limit:
        raise AccountBusy(execution.account_id, limit)
