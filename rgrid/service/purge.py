"""Removing unused cache entries from the database and the object store: cache rows, blobs,
abandoned uploads and executions past their retention. Shared by the nightly purge (whose
per-host part, environment folders and blob caches, is in rgrid/service/maintenance.py) and by
`rgrid cache purge`. Nothing here talks to a Docker host: the API imports it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rgrid.core import metrics
from rgrid.core.cache_keys import log_object_key
from rgrid.core.config import Settings
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.core.models import (
    Blob,
    DependencyCache,
    Execution,
    OutputCache,
    ScriptCache,
    utcnow,
)
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.pipeline import reuse
from rgrid.store.objectstore import ObjectStore, forget_presence
from rgrid.store.uploads import purge_abandoned_uploads

UNUSED_AFTER = timedelta(days=30)


def _cutoff(unused: timedelta | None) -> object:
    return utcnow() - (UNUSED_AFTER if unused is None else unused)


def _stale(model, unused: timedelta | None, account_id: int | None):
    query = select(model).where(model.last_used_at < _cutoff(unused))
    return query if account_id is None else query.where(model.account_id == account_id)


#: Rows deleted per statement by a bulk purge.
PURGE_BATCH = 50_000


def purge_script_cache(
    session: Session, unused: timedelta | None = None, account_id: int | None = None
) -> int:
    """Drop script-cache rows unused for 30 days (or ``unused``; of one account, or all). In
    bulk, a batch per statement: nothing else hangs on a script row (its bytes are a blob),
    and loading each row to delete it took 4 s per 20,000 rows (bench/cache_lookup.py)."""
    removed = 0
    while True:
        batch = _stale(ScriptCache, unused, account_id).with_only_columns(ScriptCache.id)
        result = session.execute(
            delete(ScriptCache)
            .where(ScriptCache.id.in_(batch.limit(PURGE_BATCH).scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        removed += result.rowcount
        if result.rowcount < PURGE_BATCH:
            return removed


def purge_dependency_cache(
    session: Session,
    environments_dir: Path | None,
    unused: timedelta | None = None,
    account_id: int | None = None,
) -> int:
    """Drop dependency-cache rows unused for 30 days, and the environment folders in
    ``environments_dir`` (None: none) that no remaining row names. The nightly purge leaves
    the folders to each host's ``purge_local_caches``."""
    stale = list(session.scalars(_stale(DependencyCache, unused, account_id)))
    for row in stale:
        session.delete(row)
    session.flush()
    if environments_dir is None:
        return len(stale)
    from rgrid.host import environments  # only with a folder to clean: it brings docker-py

    still_used = set(session.scalars(select(DependencyCache.environment)))
    for row in stale:
        if row.environment and row.environment not in still_used:
            environments.remove(environments_dir, row.environment)
    return len(stale)


def purge_blobs(store: ObjectStore, session: Session, settings: Settings | None = None) -> int:
    """Drop blobs (inputs and outputs) unused for 30 days, and their bytes; and abandoned
    uploads (``purge_abandoned_uploads``)."""
    count, _ = purge_blob_rows(store, session)
    purge_abandoned_uploads(store, session, settings or Settings())
    return count


def purge_blob_rows(
    store: ObjectStore,
    session: Session,
    unused: timedelta | None = None,
    account_id: int | None = None,
) -> tuple[int, int]:
    """Blobs unused for 30 days (or ``unused``) and their stored bytes: (count, bytes)."""
    stale = list(session.scalars(_stale(Blob, unused, account_id)))
    drop_blobs(store, session, stale)
    return len(stale), sum(blob.size for blob in stale)


def drop_blobs(store: ObjectStore, session: Session, stale: list[Blob]) -> None:
    """Delete these blob rows and their bytes: an object of its own at once, a pack (small
    outputs back to back, rgrid/store/output_blobs.py) only once no row points into it any
    more. The other blobs of a pack may still be in use (a later run produced the same file, a
    live output-cache entry replays it): their bytes stay, the pack with them. A pack two
    concurrent purges both left, each seeing the other's rows, is swept as a stray
    (``maintenance.purge_stray_packs``)."""
    packs: set[str] = set()
    for blob in stale:
        if blob.pack_offset is None:
            store.delete(blob.object_key)
            forget_presence(blob.object_key)
        else:
            packs.add(blob.object_key)
        session.delete(blob)
    session.flush()
    for key in sorted(packs - packs_in_use(session, packs)):
        store.delete(key)
        forget_presence(key)


def packs_in_use(session: Session, keys) -> set[str]:
    """Those of these pack keys some blob row still points into (one query per 1,000)."""
    keys = list(keys)
    used: set[str] = set()
    for start in range(0, len(keys), 1000):
        used.update(
            session.scalars(
                select(Blob.object_key)
                .where(Blob.object_key.in_(keys[start : start + 1000]))
                .distinct()
            )
        )
    return used


def purge_old_executions(
    store: ObjectStore, session: Session, retention: timedelta, limit: int = 10_000
) -> int:
    """Finished executions older than the retention: their stored log and their row (their
    outputs are blobs, purged when unused). Returns how many."""
    # A run whose log a live output-cache entry or a kept reused execution replays stays
    # until they are gone (the reused ones are newer, so go first).
    replayed = select(OutputCache.execution_id).union(
        select(Execution.reused_from).where(Execution.reused_from.is_not(None))
    )
    old = list(
        session.scalars(
            select(Execution)
            .where(
                Execution.status.in_(TERMINAL_STATUSES),
                Execution.finished_at < utcnow() - retention,
                Execution.id.not_in(replayed),
            )
            .limit(limit)
        )
    )
    for execution in old:
        store.delete(log_object_key(execution.id))
        session.delete(execution)
    return len(old)


def purge_shared(settings: Settings, session_factory, store: ObjectStore) -> dict:
    """The purge's shared part, once for the grid: cache rows, blobs, abandoned uploads and
    executions past their retention. Each kind in its own transaction, so one failing does
    not undo the others. Returns counts and bytes, and counts them in the metrics."""
    unused = timedelta(days=settings.cache_unused_days)
    result: dict[str, int] = {}
    with session_scope(session_factory) as session:
        result["script_cache"] = purge_script_cache(session, unused)
    with session_scope(session_factory) as session:
        result["dependency_cache"] = purge_dependency_cache(session, None, unused)
    with session_scope(session_factory) as session:
        result["output_cache"] = reuse.drop_entries(session, None, _cutoff(unused))
    with session_scope(session_factory) as session:
        # A live output-cache entry's blobs were touched when it was last used, so they are
        # no older than it: none of them is stale while it is live.
        result["blobs"], result["blob_bytes"] = purge_blob_rows(store, session, unused)
    with session_scope(session_factory) as session:
        result["uploads"], result["upload_bytes"] = purge_abandoned_uploads(
            store, session, settings
        )
    with session_scope(session_factory) as session:
        result["executions"] = purge_old_executions(
            store, session, timedelta(days=settings.retention_days)
        )
    for kind, size_key in (
        ("script_cache", None),
        ("dependency_cache", None),
        ("output_cache", None),
        ("blobs", "blob_bytes"),
        ("uploads", "upload_bytes"),
        ("executions", None),
    ):
        size = result[size_key] if size_key else 0
        metrics.count_removed(metrics.PURGED, metrics.PURGED_BYTES, kind, result[kind], size)
    return result


def purge_account(
    session: Session,
    store: ObjectStore,
    account_id: int,
    older_than: timedelta,
    environments_dir: Path | None = None,
) -> dict[str, int]:
    """`rgrid cache purge`: one account's own entries unused for ``older_than`` (zero: all).
    Blobs an unfinished execution of the account still needs are kept. ``environments_dir``:
    also delete this host's folders no row names any more (the embedded default; worker
    hosts drop theirs in their nightly ``purge_local_caches``)."""
    result = {
        "script_cache": purge_script_cache(session, older_than, account_id),
        "dependency_cache": purge_dependency_cache(
            session, environments_dir, older_than, account_id
        ),
        "output_cache": reuse.drop_entries(session, account_id, _cutoff(older_than)),
    }
    needed = {
        item["sha256"]
        for inputs in session.scalars(
            select(Execution.inputs).where(
                Execution.account_id == account_id, Execution.status.not_in(TERMINAL_STATUSES)
            )
        )
        for item in inputs or []
    }
    stale = [
        blob
        for blob in session.scalars(_stale(Blob, older_than, account_id))
        if blob.digest not in needed
    ]
    drop_blobs(store, session, stale)
    result["blobs"], result["blob_bytes"] = len(stale), sum(blob.size for blob in stale)
    return result


def purge_age(older_than_s: int | None, everything: bool) -> timedelta:
    """`rgrid cache purge`'s choice: entries unused this long, or (``everything``) all."""
    if everything == (older_than_s is not None):
        raise BadInput("give either --older-than AGE or --all")
    return timedelta(0) if everything else timedelta(seconds=older_than_s or 0)
