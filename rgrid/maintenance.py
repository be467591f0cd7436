"""Keeping the grid bounded: reaping leftover containers and purging unused cache entries."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta
from pathlib import Path

import docker
from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid import environments
from rgrid.cache_keys import UPLOAD_STAGING_PREFIX
from rgrid.docker_engine import DEADLINE_LABEL, MANAGED_LABEL
from rgrid.models import (
    Blob,
    DependencyCache,
    Execution,
    ScriptCache,
    Upload,
    utcnow,
)
from rgrid.objectstore import ObjectStore, PresigningStore
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


#: A sandbox container still only created this long after its creation was never started.
NEVER_STARTED_AFTER_S = 600


def _never_started(container: dict, now: float) -> bool:
    created = container.get("Created")
    return (
        container.get("State") == "created"
        and isinstance(created, int)
        and now - created > NEVER_STARTED_AFTER_S
    )


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
        if _never_started(container, now):
            # Created by a process killed before it started it (any installation's): it
            # will never end itself, and it keeps its folder's filesystem counted as alive.
            with contextlib.suppress(docker.errors.APIError):
                client.api.remove_container(container["Id"], force=True)
            continue
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
        # A batch's execution waits for its turn (its batch's `parallel`) before its clock
        # starts: from when it was handed to the queue.
        if execution.batch_id is not None and execution.dispatched_at is None:
            continue
        created = execution.dispatched_at or execution.created_at
        if created.tzinfo is None:  # SQLite drops the zone
            created = created.replace(tzinfo=now.tzinfo)
        if now - created > timedelta(seconds=execution.timeout_s) + LOST_AFTER:
            execution.status = execution.outcome = "error"
            execution.error = "lost: no worker finished this execution; run it again"
            execution.finished_at = now
            lost.append(execution.id)
    return lost


def purge_script_cache(session: Session) -> int:
    """Drop script-cache rows unused for 30 days (the scripts' bytes go with the blobs)."""
    cutoff = utcnow() - UNUSED_AFTER
    stale = list(session.scalars(select(ScriptCache).where(ScriptCache.last_used_at < cutoff)))
    for row in stale:
        session.delete(row)
    return len(stale)


def purge_dependency_cache(session: Session, environments_dir: Path) -> int:
    """Drop dependency-cache rows unused for 30 days, and the environment folders on this host
    that no remaining row names."""
    cutoff = utcnow() - UNUSED_AFTER
    stale = list(
        session.scalars(select(DependencyCache).where(DependencyCache.last_used_at < cutoff))
    )
    for row in stale:
        session.delete(row)
    session.flush()
    still_used = set(session.scalars(select(DependencyCache.environment)))
    for row in stale:
        if row.environment and row.environment not in still_used:
            environments.remove(environments_dir, row.environment)
    return len(stale)


#: An environment folder younger than this is never purged as an orphan: its row may not be
#: committed yet (the folder is renamed into place first).
ORPHAN_GRACE = timedelta(hours=1)


def purge_local_environments(session: Session, environments_dir: Path) -> list[str]:
    """On one worker host: remove the environment folders no dependency-cache row names any
    more. The nightly purge drops the rows once for the grid; each host then removes its own
    copies here (the purge's own host could only remove its own)."""
    if not environments_dir.is_dir():
        return []
    named = set(session.scalars(select(DependencyCache.environment)))
    cutoff = time.time() - ORPHAN_GRACE.total_seconds()
    removed = []
    for folder in environments_dir.iterdir():
        if folder.name.startswith(".") or folder.name in named or not folder.is_dir():
            continue
        if folder.stat().st_mtime > cutoff:
            continue
        environments.remove(environments_dir, folder.name)
        removed.append(folder.name)
    return removed


def purge_blobs(store: ObjectStore, session: Session) -> int:
    """Drop blobs (inputs and outputs) unused for 30 days, and their bytes; and uploads that
    were started a day ago and never completed."""
    cutoff = utcnow() - UNUSED_AFTER
    stale = list(session.scalars(select(Blob).where(Blob.last_used_at < cutoff)))
    for blob in stale:
        store.delete(blob.object_key)
        session.delete(blob)
    abandoned = list(
        session.scalars(select(Upload).where(Upload.created_at < utcnow() - timedelta(days=1)))
    )
    for upload in abandoned:
        if upload.multipart_id and hasattr(store, "abort_multipart"):
            store.abort_multipart(upload.object_key, upload.multipart_id)
        store.delete(upload.object_key)
        session.delete(upload)
    session.flush()
    purge_stray_uploads(store, session)
    return len(stale)


#: A staging object no upload row names is never one being written (the row is committed
#: before its URL is handed out); the margin only keeps clear of clock skew.
STRAY_UPLOAD_AGE_S = 3600


def purge_stray_uploads(store: ObjectStore, session: Session) -> int:
    """Delete staging objects no upload is waiting for: bytes sent through a presigned URL
    again after its upload completed or was given up. Nothing reads them, but they take room."""
    if not isinstance(store, PresigningStore):
        return 0  # the embedded default's folder never takes presigned uploads
    pending = set(session.scalars(select(Upload.object_key)))
    stray = [
        key
        for key in store.keys_older_than(UPLOAD_STAGING_PREFIX, STRAY_UPLOAD_AGE_S)
        if key not in pending
    ]
    for key in stray:
        store.delete(key)
    return len(stray)
