"""How a batch is doing, for the API and the embedded default: a batch found by id or
prefix, its executions counted per status from their rows (never from a counter that could
drift from them), listed, and paged through."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from rgrid.core.errors import BadInput, NotFound
from rgrid.core.models import Batch, Execution, iso_utc
from rgrid.core.statuses import TERMINAL_STATUSES, Status
from rgrid.service.batches import BATCH_ID_DIGITS, PAGE_SIZE
from rgrid.service.executions import MIN_ID_PREFIX, execution_to_dict


def get_batch(session: Session, account_id: int, batch_id: str) -> Batch:
    """By id, a unique prefix of one, or ``last``: the account's newest."""
    mine = select(Batch).where(Batch.account_id == account_id)
    if batch_id == "last":
        found = session.scalars(mine.order_by(Batch.created_at.desc()).limit(1)).first()
        if found is None:
            raise NotFound("no batches yet")
        return found
    if not re.fullmatch(f"[0-9a-f]{{{MIN_ID_PREFIX},{BATCH_ID_DIGITS}}}", batch_id):
        raise NotFound(f"no batch {batch_id}")
    matches = list(session.scalars(mine.where(Batch.id.startswith(batch_id)).limit(2)))
    if len(matches) > 1:
        raise BadInput(f"{batch_id} is the start of more than one batch id")
    if not matches:
        raise NotFound(f"no batch {batch_id}")
    return matches[0]


def counts(session: Session, batch_id: str) -> dict[str, int]:
    """Executions per status, from the rows themselves (the latest attempt of each input)."""
    return dict(
        session.execute(
            select(Execution.status, func.count())
            .where(Execution.batch_id == batch_id, Execution.superseded.is_(False))
            .group_by(Execution.status)
        ).all()
    )


def reused_count(session: Session, batch_id: str) -> int:
    """How many of the batch's current executions were answered from the output cache."""
    return session.scalar(
        select(func.count())
        .select_from(Execution)
        .where(
            Execution.batch_id == batch_id,
            Execution.superseded.is_(False),
            Execution.reused_from.is_not(None),
        )
    )


def batch_to_dict(session: Session, batch: Batch) -> dict:
    by_status = counts(session, batch.id)
    total = sum(by_status.values())
    reused = reused_count(session, batch.id) if by_status.get(Status.SUCCEEDED) else 0
    done = sum(n for status, n in by_status.items() if status in TERMINAL_STATUSES)
    return {
        "batch_id": batch.id,
        "script_name": batch.script_name,
        "script_hash": batch.script_hash,
        "runtime": batch.runtime,
        "parallel": batch.parallel,
        "total": total,
        "finished": done,
        "counts": by_status,
        # Answered from earlier runs' outputs without running (--reuse); counted among
        # ``succeeded`` too.
        "reused": reused,
        "reuse": (batch.template or {}).get("reuse"),
        "done": batch.started_at is not None and done == total,
        "cancelled": batch.cancelled_at is not None,
        "created_at": iso_utc(batch.created_at),
        "started_at": iso_utc(batch.started_at),
        "cancelled_at": iso_utc(batch.cancelled_at),
    }


def list_batches(session: Session, account_id: int, limit: int = 20) -> list[Batch]:
    return list(
        session.scalars(
            select(Batch)
            .where(Batch.account_id == account_id)
            .order_by(Batch.created_at.desc())
            .limit(max(1, min(limit, 500)))
        )
    )


def executions_page(
    session: Session,
    batch: Batch,
    *,
    after: str = "",
    finished_since: datetime | None = None,
    limit: int = 500,
) -> list[dict]:
    """A page of the batch's current executions: by id after ``after``; or, with
    ``finished_since``, the finished ones in the order they finished, from that time on
    (ties broken by id, after ``after``), which is how a follower learns what just ended."""
    query = select(Execution).where(Execution.batch_id == batch.id, Execution.superseded.is_(False))
    if finished_since is None:
        query = query.where(Execution.id > after).order_by(Execution.id)
    else:
        query = query.where(
            Execution.status.in_(TERMINAL_STATUSES),
            or_(
                Execution.finished_at > finished_since,
                and_(Execution.finished_at == finished_since, Execution.id > after),
            ),
        ).order_by(Execution.finished_at, Execution.id)
    rows = session.scalars(query.limit(max(1, min(limit, PAGE_SIZE))))
    return [{**execution_to_dict(row), "batch_item": row.batch_item} for row in rows]
