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

from rgrid.core.models import (
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


def _lookups() -> dict[str, tuple]:
    """Per cache type: the execution column saying it hit, and the condition that says the
    execution looked that cache up at all."""
    return {
        "script": (Execution.script_cache_hit, Execution.dependency_hash.is_not(None)),
        "dependency": (Execution.dependency_cache_hit, Execution.dependency_cache_hit.is_not(None)),
        "input": (Execution.input_cache_hit, Execution.input_hash.is_not(None)),
        "outputs": (Execution.output_cache_hit, Execution.output_cache_hit.is_not(None)),
    }


def hit_rates(session: Session, account_id: int, days: int) -> dict[str, dict]:
    """Per cache type over the last ``days``: lookups, hits and their ratio, counted from the
    executions that looked the caches up (input: executions with input files)."""
    since = utcnow() - timedelta(days=days)
    mine = (Execution.account_id == account_id, Execution.created_at >= since)
    rates: dict[str, dict] = {}
    for cache, (hit, looked_up) in _lookups().items():
        lookups, hits = session.execute(
            select(func.count(), as_int(hit)).where(*mine, looked_up)
        ).one()
        rates[cache] = _rate(int(hits), int(lookups))
    return rates


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


def _listings() -> list[tuple]:
    """Per cache type: its table and how one row reads in `rgrid cache ls`."""
    return [
        (
            ScriptCache,
            lambda r: _entry("script", r.script_hash, r.runtime, None, r.last_used_at, r.use_count),
        ),
        (
            DependencyCache,
            lambda r: _entry(
                "dependency",
                r.dependency_hash,
                r.runtime,
                None,
                r.last_used_at,
                r.use_count,
                packages=len(r.resolved or []),
            ),
        ),
        (Blob, lambda r: _entry("input", r.digest, None, r.size, r.last_used_at, r.use_count)),
        (
            OutputCache,
            lambda r: _entry(
                "outputs",
                r.action_key,
                None,
                r.bytes,
                r.last_used_at,
                r.use_count,
                execution_id=r.execution_id,
            ),
        ),
    ]


def entries(session: Session, account_id: int, limit: int = 100) -> list[dict]:
    """The account's cache entries, most recently used first (`rgrid cache ls`): the newest
    ``limit`` of each type, merged."""
    found: list[dict] = []
    for model, render in _listings():
        rows = session.scalars(
            select(model)
            .where(model.account_id == account_id)
            .order_by(model.last_used_at.desc())
            .limit(limit)
        )
        found.extend(render(row) for row in rows)
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
