"""Keeping the grid bounded: reaping leftover containers and purging unused cache entries."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import docker
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rgrid import disk, environments, metrics
from rgrid.cache_keys import log_object_key
from rgrid.config import Settings
from rgrid.db import session_scope
from rgrid.docker_engine import DEADLINE_LABEL, MANAGED_LABEL
from rgrid.errors import BadInput
from rgrid.models import (
    Blob,
    DependencyCache,
    Execution,
    ScriptCache,
    Upload,
    utcnow,
)
from rgrid.objectstore import ObjectStore
from rgrid.pool import sweep_folders
from rgrid.sandbox import RUN_NAME_PREFIX
from rgrid.statuses import TERMINAL_STATUSES

log = logging.getLogger(__name__)

UNUSED_AFTER = timedelta(days=30)


def _abandoned(labels: dict[str, str], execution: Execution | None, now: float) -> bool:
    """Over in our database, or past the deadline stamped on it. A container this database does
    not know may belong to another installation (or the embedded default) sharing the Docker
    host, so only its deadline may condemn it."""
    if execution is not None and execution.status in TERMINAL_STATUSES:
        return True
    try:
        return now > int(labels.get(DEADLINE_LABEL, ""))
    except ValueError:
        return False


def reap_containers(
    client: docker.DockerClient, session: Session, sandboxes_dir: Path
) -> list[str]:
    """Remove execution sandboxes that nobody will ever collect, and the host folders of
    sandboxes that are gone.

    A sandbox ends itself (its supervisor enforces the deadline, and the engine removes it),
    so this is the backstop for a runner killed between the script's end and its cleanup."""
    removed = []
    now = time.time()
    # The low-level listing: the high-level one inspects each container, and sandboxes remove
    # themselves at any moment (a 404 there failed the whole reap).
    for container in client.api.containers(all=True, filters={"label": MANAGED_LABEL}):
        name = container["Names"][0].lstrip("/") if container.get("Names") else ""
        if not name.startswith(RUN_NAME_PREFIX):
            continue  # unclaimed pool sandboxes end themselves when idle
        execution_id = name.removeprefix(RUN_NAME_PREFIX)
        labels = container.get("Labels") or {}
        if not _abandoned(labels, session.get(Execution, execution_id), now):
            continue
        try:
            client.api.remove_container(container["Id"], force=True)
        except docker.errors.APIError as exc:  # already gone, or being removed by its runner
            log.info("could not reap %s: %s", execution_id, exc)
            continue
        removed.append(execution_id)
    sweep_folders(client, sandboxes_dir)
    return removed


#: How long past its own timeout an unfinished execution may take (queueing, builds) before
#: it is declared lost.
LOST_AFTER = timedelta(hours=2)


def sweep_lost_executions(session: Session) -> list[str]:
    """End executions no worker will ever finish (a task killed at its hard limit, a broker
    message lost with Redis), so that a CLI following one stops waiting."""
    now = utcnow()
    lost = []
    rows = session.scalars(select(Execution).where(Execution.status.not_in(TERMINAL_STATUSES)))
    for execution in rows:
        created = execution.created_at
        if created.tzinfo is None:  # SQLite drops the zone
            created = created.replace(tzinfo=now.tzinfo)
        if now - created > timedelta(seconds=execution.timeout_s) + LOST_AFTER:
            execution.status = execution.outcome = "error"
            execution.error = "lost: no worker finished this execution; run it again"
            execution.finished_at = now
            lost.append(execution.id)
    return lost


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
    still_used = set(session.scalars(select(DependencyCache.environment)))
    for row in stale:
        if row.environment and row.environment not in still_used:
            environments.remove(environments_dir, row.environment)
    return len(stale)


def purge_blobs(store: ObjectStore, session: Session) -> int:
    """Drop blobs (inputs and outputs) unused for 30 days, and their bytes; and uploads that
    were started a day ago and never completed."""
    count, _ = purge_blob_rows(store, session)
    purge_abandoned_uploads(store, session)
    return count


def purge_blob_rows(
    store: ObjectStore,
    session: Session,
    unused: timedelta | None = None,
    account_id: int | None = None,
) -> tuple[int, int]:
    """Blobs unused for 30 days (or ``unused``) and their stored bytes: (count, bytes)."""
    stale = list(session.scalars(_stale(Blob, unused, account_id)))
    for blob in stale:
        store.delete(blob.object_key)
        session.delete(blob)
    return len(stale), sum(blob.size for blob in stale)


#: An upload not completed within this long never will be.
ABANDONED_AFTER = timedelta(days=1)


def purge_abandoned_uploads(store: ObjectStore, session: Session) -> tuple[int, int]:
    """Uploads started a day ago and never completed: (count, bytes they announced)."""
    abandoned = list(
        session.scalars(select(Upload).where(Upload.created_at < utcnow() - ABANDONED_AFTER))
    )
    for upload in abandoned:
        if upload.multipart_id and hasattr(store, "abort_multipart"):
            store.abort_multipart(upload.object_key, upload.multipart_id)
        store.delete(upload.object_key)
        session.delete(upload)
    return len(abandoned), sum(upload.size for upload in abandoned)


def purge_old_executions(
    store: ObjectStore, session: Session, retention: timedelta, limit: int = 10_000
) -> int:
    """Finished executions older than the retention: their stored log and their row (their
    outputs are blobs, purged when unused). Returns how many."""
    old = list(
        session.scalars(
            select(Execution)
            .where(
                Execution.status.in_(TERMINAL_STATUSES),
                Execution.finished_at < utcnow() - retention,
            )
            .limit(limit)
        )
    )
    for execution in old:
        store.delete(log_object_key(execution.id))
        session.delete(execution)
    return len(old)


#: An environment folder no row names is an orphan only once it is this old.
ORPHAN_AFTER_S = 3600.0


def purge_local_caches(settings: Settings, session: Session | None, client=None) -> dict:
    """This host's part of the purge, run by every worker host (and by the embedded default):
    environment folders no dependency-cache row names any more, blob-cache files unused for
    the purge's period, then the disk budget. Returns counts and bytes."""
    removed = disk.Removed()
    now = time.time()
    if session is not None and settings.environments_dir.is_dir():
        named = set(session.scalars(select(DependencyCache.environment)))
        for entry in disk.entries(settings):
            orphan = entry.kind == "environment" and entry.path.name not in named
            # A folder installed in the last hour may not have its row written yet.
            old = now - entry.last_used > ORPHAN_AFTER_S
            if orphan and old and disk.remove_environment(settings, entry.path, client):
                removed.add("environment", entry.size)
    unused_s = settings.cache_unused_days * 86400
    for entry in disk.entries(settings):
        if entry.kind == "blob" and now - entry.last_used > unused_s:
            entry.path.unlink(missing_ok=True)
            removed.add("blob", entry.size)
    for kind, n in removed.counts.items():
        metrics.count_removed(
            metrics.PURGED, metrics.PURGED_BYTES, f"host_{kind}", n, removed.bytes[kind]
        )
    evicted = disk.enforce_budget(settings, client)
    return {**removed.as_dict(), **{f"evicted_{k}": v for k, v in evicted.as_dict().items()}}


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
        result["blobs"], result["blob_bytes"] = purge_blob_rows(store, session, unused)
    with session_scope(session_factory) as session:
        result["uploads"], result["upload_bytes"] = purge_abandoned_uploads(store, session)
    with session_scope(session_factory) as session:
        result["executions"] = purge_old_executions(
            store, session, timedelta(days=settings.retention_days)
        )
    for kind, size_key in (
        ("script_cache", None),
        ("dependency_cache", None),
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
    for blob in stale:
        store.delete(blob.object_key)
        session.delete(blob)
    result["blobs"], result["blob_bytes"] = len(stale), sum(blob.size for blob in stale)
    return result


def purge_age(older_than_s: int | None, everything: bool) -> timedelta:
    """`rgrid cache purge`'s choice: entries unused this long, or (``everything``) all."""
    if everything == (older_than_s is not None):
        raise BadInput("give either --older-than AGE or --all")
    return timedelta(0) if everything else timedelta(seconds=older_than_s or 0)


def purge_local_files(settings: Settings, older_than: timedelta) -> dict[str, int]:
    """The embedded default's own blob cache: files unused for ``older_than`` (zero: all)."""
    removed = disk.Removed()
    now = time.time()
    for entry in disk.entries(settings):
        if entry.kind == "blob" and now - entry.last_used >= older_than.total_seconds():
            entry.path.unlink(missing_ok=True)
            removed.add("local_blob", entry.size)
    return removed.as_dict()
