"""The script and dependency cache tables as the steps read and touch them: the lookups
(built once, only the columns needed), the savepoint that lets a run go on without a damaged
cache, and the script cache row a finished run records."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Row, bindparam, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.models import DependencyCache, Execution, ScriptCache, utcnow
from rgrid.host import environments

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext

log = logging.getLogger(__name__)


def _tree_key(execution: Execution) -> str:
    return cache_keys.source_key(execution.source_digest, execution.script_hash)


def _script_row(session: Session, execution: Execution) -> ScriptCache | None:
    return session.scalars(
        select(ScriptCache).where(
            ScriptCache.account_id == execution.account_id,
            ScriptCache.runtime == execution.runtime,
            ScriptCache.dependency_hash == execution.dependency_hash,
            ScriptCache.script_hash == _tree_key(execution),
        )
    ).one_or_none()


#: The script-cache lookup of the cache-lookup step: built once, only the column it needs
#: (bench/cache_lookup.py: a whole ORM row built per call cost ~2x at a million rows).
_SCRIPT_ENVIRONMENT = select(ScriptCache.environment).where(
    ScriptCache.account_id == bindparam("account_id"),
    ScriptCache.runtime == bindparam("runtime"),
    ScriptCache.dependency_hash == bindparam("dependency_hash"),
    ScriptCache.script_hash == bindparam("script_hash"),
)


def script_cache_environment(session: Session, execution: Execution) -> Row | None:
    """The script-cache entry's environment (a row with ``.environment``), or None: a miss."""
    key = {
        "account_id": execution.account_id,
        "runtime": execution.runtime,
        "dependency_hash": execution.dependency_hash,
        "script_hash": _tree_key(execution),
    }
    # On the session's connection, in its transaction, past the ORM's execution path (a
    # plain column needs none of it): p50 0.11 ms against 0.20 ms through session.execute.
    return session.connection().execute(_SCRIPT_ENVIRONMENT, key).first()


def dependency_row(session: Session, execution: Execution) -> DependencyCache | None:
    return session.scalars(
        select(DependencyCache).where(
            DependencyCache.account_id == execution.account_id,
            DependencyCache.runtime == execution.runtime,
            DependencyCache.dependency_hash == execution.dependency_hash,
        )
    ).one_or_none()


@contextmanager
def cache_tables(ctx: PipelineContext, execution_id: str, session: Session) -> Iterator[None]:
    """Cache-table work in a savepoint. If the cache tables cannot be read or written (a
    damaged or locked table), the execution goes on without the cache, as a miss, and says
    so; losing the whole database is not this (it raises, and the step is retried)."""
    try:
        with session.begin_nested():
            yield
    except DBAPIError as exc:
        _cache_unavailable(ctx, execution_id, exc)


@contextmanager
def cache_reads(ctx: PipelineContext, execution_id: str, session: Session) -> Iterator[None]:
    """``cache_tables`` for lookups made before the step has changed anything: no savepoint
    (two round trips fewer on every lookup; bench/cache_lookup.py), and a failure rolls back
    a transaction that held nothing yet (the execution row is read again on next use)."""
    try:
        yield
    except DBAPIError as exc:
        session.rollback()
        _cache_unavailable(ctx, execution_id, exc)


def _cache_unavailable(ctx: PipelineContext, execution_id: str, exc: DBAPIError) -> None:
    if exc.connection_invalidated:
        raise exc
    reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
    log.warning("%s: cache unavailable, going on as a miss: %s", execution_id, reason)
    ctx.note(execution_id, f"cache unavailable ({reason}): going on without it")


def environment_present(ctx: PipelineContext, name: str | None) -> bool:
    return environments.present(ctx.settings.environments_dir, name)


def remember_script(session: Session, execution: Execution) -> None:
    """Record (or touch) the script cache row: the next run of these bytes in this environment
    resolves, fetches and builds nothing."""
    row = _script_row(session, execution)
    if row is None:
        row = ScriptCache(
            account_id=execution.account_id,
            runtime=execution.runtime,
            dependency_hash=execution.dependency_hash,
            script_hash=_tree_key(execution),
            use_count=0,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:  # a concurrent run of the same script wrote it first
            row = _script_row(session, execution)
            if row is None:
                return
    row.environment = execution.environment
    row.runtime_image = execution.runtime_image
    row.last_used_at = utcnow()
    # In SQL, not in Python: concurrent runs of one script must each count.
    row.use_count = ScriptCache.use_count + 1
