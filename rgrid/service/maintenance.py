"""Keeping the grid bounded: reaping leftover containers and purging unused cache entries."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import docker
from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core import lifecycle, metrics
from rgrid.core.cache_keys import DEADLINE_LABEL, MANAGED_LABEL, PACK_PREFIX, UPLOAD_STAGING_PREFIX
from rgrid.core.config import Settings
from rgrid.core.models import DependencyCache, Execution, Upload, utcnow
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.host import disk
from rgrid.host.pool import sweep_folders
from rgrid.host.sandbox import RUN_NAME_PREFIX
from rgrid.store.objectstore import ObjectStore, PresigningStore

log = logging.getLogger(__name__)


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
    client: docker.DockerClient,
    session: Session,
    sandboxes_dir: Path,
    journal_dir: Path | None = None,
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
    if journal_dir is not None:
        forget_finished_journals(session, journal_dir)
    return removed


#: A journal file this old is looked at: younger ones may be an execution just starting.
JOURNAL_MIN_AGE_S = 600.0


def forget_finished_journals(session: Session, journal_dir: Path) -> int:
    """Delete this host's log journals (``redis_logs.JournaledLogBuffer``) of executions that
    are over or unknown: one ended by another host (the lease sweep, a move) is never
    cleared here by its own store step. Returns how many."""
    removed = 0
    now = time.time()
    for path in journal_dir.glob("*.jsonl") if journal_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime < JOURNAL_MIN_AGE_S:
                continue
            execution = session.get(Execution, path.stem)
            if execution is None or execution.status in TERMINAL_STATUSES:
                path.unlink()
                removed += 1
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
            lifecycle.fail(execution, "lost: no worker finished this execution; run it again")
            lost.append(execution.id)
    return lost


#: An environment folder no row names is an orphan only once it is this old.
ORPHAN_AFTER_S = 3600.0


def purge_local_caches(
    settings: Settings,
    session: Session | None,
    client=None,
    on_removed_environment: Callable[[str], None] | None = None,
) -> dict:
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
                if on_removed_environment is not None:
                    on_removed_environment(entry.path.name)
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


def purge_local_files(settings: Settings, older_than: timedelta) -> dict[str, int]:
    """The embedded default's own blob cache: files unused for ``older_than`` (zero: all)."""
    removed = disk.Removed()
    now = time.time()
    for entry in disk.entries(settings):
        if entry.kind == "blob" and now - entry.last_used >= older_than.total_seconds():
            entry.path.unlink(missing_ok=True)
            removed.add("local_blob", entry.size)
    return removed.as_dict()


#: A staging object no upload row names is never one being written (the row is committed
#: before its URL is handed out); the margin only keeps clear of clock skew. Swept with the
#: abandoned uploads every 10 minutes (celeryconfig.py).
STRAY_UPLOAD_AGE_S = 600


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


def purge_stray_packs(store: ObjectStore, session: Session, settings: Settings) -> int:
    """Delete packs of small outputs (store/output_blobs.py) no blob row points into: one whose
    worker died between its PUT and its rows' commit, or one two concurrent purges each left
    to the other. A pack's rows are written when its run's outputs are all stored, within the
    run's time limit: a pack older than the longest one allows and unreferenced is a stray."""
    if not isinstance(store, PresigningStore):
        return 0  # the embedded default's folder: its purge sees every row (one process)
    from rgrid.service.purge import packs_in_use

    age = settings.max_timeout_s + 3600
    candidates = store.keys_older_than(PACK_PREFIX, age)
    stray = set(candidates) - packs_in_use(session, candidates)
    for key in sorted(stray):
        store.delete(key)
    return len(stray)
