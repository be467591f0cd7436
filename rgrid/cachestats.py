"""What the caches hold and how often they hit, from the database: for the operator's gauges
(every account) and for ``rgrid cache stats|ls|purge`` (one account's own entries).

Hit rates per account come from the executions' own cache flags, not from Prometheus: the
metrics are per deployment and have no account label (an account label would let series grow
without bound), while every execution row already says which caches it hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session

from rgrid.models import (
    Blob,
    DependencyCache,
    Execution,
    OutputCache,
    ScriptCache,
    iso_utc,
    utcnow,
)

#: The windows `rgrid cache stats` reports hit rates over, in days.
WINDOWS_DAYS = (1, 7, 30)

_TABLES = {
    "script": ScriptCache,
    "dependency": DependencyCache,
    "input": Blob,
    "outputs": OutputCache,
}


@dataclass(frozen=True)
class Totals:
    cache: str
    entries: int
    #: Bytes the database knows of (input: stored blobs; script and dependency: 0, their
    #: size lives on the worker hosts' disks and in the hosts' own gauges).
    bytes: int
    oldest_used: datetime | None


def totals(session: Session, account_id: int | None) -> list[Totals]:
    """Entries, bytes and the least recent use per cache type; ``account_id`` None: all."""
    found = []
    for cache, model in _TABLES.items():
        size = (
            func.coalesce(func.sum(Blob.size), 0)
            if model is Blob
            else func.coalesce(func.sum(OutputCache.bytes), 0)
            if model is OutputCache
            else 0
        )
        query = select(func.count(model.id), size, func.min(model.last_used_at))
        if account_id is not None:
            query = query.where(model.account_id == account_id)
        count, nbytes, oldest = session.execute(query).one()
        found.append(Totals(cache, int(count or 0), int(nbytes or 0), oldest))
    return found


def _rate(hits: int, lookups: int) -> dict:
    return {
        "hits": hits,
        "lookups": lookups,
        "hit_rate": round(hits / lookups, 4) if lookups else None,
    }


def hit_rates(session: Session, account_id: int, days: int) -> dict[str, dict]:
    """Per cache type over the last ``days``: lookups, hits and their ratio, counted from the
    executions that looked the caches up (input: executions with input files)."""
    since = utcnow() - timedelta(days=days)
    mine = (Execution.account_id == account_id, Execution.created_at >= since)
    script = session.execute(
        select(func.count(), as_int(Execution.script_cache_hit)).where(
            *mine, Execution.dependency_hash.is_not(None)
        )
    ).one()
    dependency = session.execute(
        select(func.count(), as_int(Execution.dependency_cache_hit)).where(
            *mine, Execution.dependency_cache_hit.is_not(None)
        )
    ).one()
    inputs = session.execute(
        select(func.count(), as_int(Execution.input_cache_hit)).where(
            *mine, Execution.input_hash.is_not(None)
        )
    ).one()
    outputs = session.execute(
        select(func.count(), as_int(Execution.output_cache_hit)).where(
            *mine, Execution.output_cache_hit.is_not(None)
        )
    ).one()
    return {
        "script": _rate(int(script[1]), int(script[0])),
        "dependency": _rate(int(dependency[1]), int(dependency[0])),
        "input": _rate(int(inputs[1]), int(inputs[0])),
        "outputs": _rate(int(outputs[1]), int(outputs[0])),
    }


def outputs_saved(session: Session, account_id: int) -> dict:
    """What the account's live output-cache entries have saved: reuses, the run time the
    scripts did not spend and the output bytes handed over without running them."""
    uses, seconds, nbytes = session.execute(
        select(
            func.coalesce(func.sum(OutputCache.use_count), 0),
            func.coalesce(func.sum(OutputCache.use_count * OutputCache.run_s), 0.0),
            func.coalesce(func.sum(OutputCache.use_count * OutputCache.bytes), 0),
        ).where(OutputCache.account_id == account_id)
    ).one()
    return {"reuses": int(uses), "run_seconds": round(float(seconds), 3), "bytes": int(nbytes)}


def as_int(flag):
    return func.coalesce(func.sum(cast(flag, Integer)), 0)


def stats(session: Session, account_id: int, last_purge: dict | None) -> dict:
    """Everything `rgrid cache stats` shows, as JSON-ready data."""
    return {
        "hit_rates": {f"{days}d": hit_rates(session, account_id, days) for days in WINDOWS_DAYS},
        "caches": {
            row.cache: {
                "entries": row.entries,
                "bytes": row.bytes,
                "oldest_used_at": iso_utc(row.oldest_used),
            }
            for row in totals(session, account_id)
        },
        "outputs_saved": outputs_saved(session, account_id),
        "last_purge": last_purge,
    }


def entries(session: Session, account_id: int, limit: int = 100) -> list[dict]:
    """The account's cache entries, most recently used first (`rgrid cache ls`)."""
    found: list[dict] = []
    for row in session.scalars(
        select(ScriptCache)
        .where(ScriptCache.account_id == account_id)
        .order_by(ScriptCache.last_used_at.desc())
        .limit(limit)
    ):
        found.append(
            _entry("script", row.script_hash, row.runtime, None, row.last_used_at, row.use_count)
        )
    for row in session.scalars(
        select(DependencyCache)
        .where(DependencyCache.account_id == account_id)
        .order_by(DependencyCache.last_used_at.desc())
        .limit(limit)
    ):
        found.append(
            _entry(
                "dependency",
                row.dependency_hash,
                row.runtime,
                None,
                row.last_used_at,
                row.use_count,
                packages=len(row.resolved or []),
            )
        )
    for row in session.scalars(
        select(Blob)
        .where(Blob.account_id == account_id)
        .order_by(Blob.last_used_at.desc())
        .limit(limit)
    ):
        found.append(_entry("input", row.digest, None, row.size, row.last_used_at, row.use_count))
    for row in session.scalars(
        select(OutputCache)
        .where(OutputCache.account_id == account_id)
        .order_by(OutputCache.last_used_at.desc())
        .limit(limit)
    ):
        found.append(
            _entry(
                "outputs",
                row.action_key,
                None,
                row.bytes,
                row.last_used_at,
                row.use_count,
                execution_id=row.execution_id,
            )
        )
    found.sort(key=lambda e: e["last_used_at"] or "", reverse=True)
    return found[:limit]


def _entry(cache, key, runtime, size, last_used, uses, **extra) -> dict:
    return {
        "cache": cache,
        "key": key,
        "runtime": runtime,
        "bytes": size,
        "last_used_at": iso_utc(last_used),
        "use_count": uses,
        **extra,
    }
