"""Fair shares of the grid's slots, so that one account cannot hold every worker slot.

There are two kinds of slot: run slots (each worker host's run pool) and build slots (its
build pool, for dependency installs, so a slow install never holds a slot a run needs). An
execution holds a build slot while ``building`` and a run slot while ``running``: the slots
are the account's rows in that status, so a worker that dies cannot leak one (its execution
is swept to ``error``).

An account's share of a kind is ``ceil(slots / accounts)``, where ``slots`` is that kind's
slots on the live hosts and ``accounts`` the accounts with work waiting or under way (one
account alone may use every slot; with N accounts each gets at most its 1/N, rounded up), and
never above the fixed cap ``RGRID_MAX_CONCURRENT_PER_ACCOUNT`` if one is set. A step that
finds its account at its share raises :class:`AccountBusy` before it does anything; the
worker then sends the step again with a countdown and frees its slot for other accounts'
work (see ``rgrid/service/routing.py``), and the execution keeps its status. So a waiting
account's first run takes the next slot that frees, while the busy account's long work goes on.
"""

from __future__ import annotations

import math
import random

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rgrid.core.models import Execution
from rgrid.core.statuses import Status

#: Statuses of an account with work waiting or under way: it counts among those sharing.
WAITING_OR_ACTIVE = (Status.QUEUED, Status.BUILDING, Status.RUNNING)
#: How long a step waits before trying again for a slot (plus up to as much again, so that
#: waiting steps do not all wake at once).
RETRY_S = 2.0
#: The advisory locks' first key: this module's, so no other lock on an account id meets it.
LOCK_SPACE = 0x5247


class AccountBusy(Exception):
    """The account has its share of executions building or running."""

    def __init__(self, account_id: int, limit: int, status: Status = Status.RUNNING):
        super().__init__(f"account {account_id} has its share ({limit}) of {status} slots")
        self.retry_s = RETRY_S + random.uniform(0, RETRY_S)


def fair_share(slots: int, accounts: int, cap: int = 0) -> int:
    """An account's share: ``ceil(slots / accounts)`` (at least 1), no more than ``cap``
    (0: no cap). One account alone gets every slot."""
    share = max(1, math.ceil(max(slots, 1) / max(accounts, 1)))
    return min(share, cap) if cap > 0 else share


def sharing_accounts(session: Session) -> int:
    """How many accounts have work waiting or under way."""
    return (
        session.scalar(
            select(func.count(func.distinct(Execution.account_id))).where(
                Execution.status.in_([str(s) for s in WAITING_OR_ACTIVE])
            )
        )
        or 0
    )


def take_slot(session: Session, execution: Execution, to: Status, slots: int, cap: int = 0) -> None:
    """Raise AccountBusy unless ``execution`` may move to ``to`` (``building`` or
    ``running``) now, within its account's fair share of the ``slots`` of that kind. Call in
    the same transaction that changes its status: on PostgreSQL a transaction-scoped advisory
    lock on the account makes the count and the change one step across workers (SQLite, the
    embedded default, serialises writers anyway). An execution already in ``to`` keeps its
    slot."""
    if execution.status == to:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(LOCK_SPACE, execution.account_id)))
    limit = fair_share(slots, sharing_accounts(session), cap)
    active = session.scalar(
        select(func.count())
        .select_from(Execution)
        .where(
            Execution.account_id == execution.account_id,
            Execution.status == str(to),
            Execution.id != execution.id,
        )
    )
    if (active or 0) >= limit:
        raise AccountBusy(execution.account_id, limit, to)
