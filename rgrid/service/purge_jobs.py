"""The purges as a deployment's beat runs them: one at a time, shared part once, then each host.

The nightly purge (``purge_caches``) takes a Redis lock (exactly one beat should run, but a
second is then harmless), purges what the deployment shares (rows, blobs, uploads, old
executions: rgrid/service/purge.py and maintenance.py) once, then broadcasts
``PURGE_LOCAL_COMMAND`` to every worker of the deployment, each of which purges its own disk
(``purge_local_caches``) and replies with what it removed; the result is kept in Redis for
`rgrid cache stats`. The purge of abandoned uploads (``purge_uploads``) takes a lock of its
own. The Celery app's remote control is handed in by workers/tasks.py, which declares the
tasks and the remote-control command that call these.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rgrid.core import cache_keys, metrics
from rgrid.core.db import session_scope
from rgrid.core.models import iso_utc, utcnow
from rgrid.pipeline.context import PipelineContext
from rgrid.service import maintenance, purge
from rgrid.service.context import redis_client

#: The remote-control command each worker runs for the purge's per-host part.
PURGE_LOCAL_COMMAND = "rgrid_purge_local"


def purge_local_caches(ctx: PipelineContext) -> dict:
    """This host's part of the purge (rgrid/service/maintenance.py): the hook every worker host
    runs when the purge broadcasts it. Environments it removes stop counting as installed
    here (the host registry's preference)."""

    def forget(name: str) -> None:
        if ctx.hosts is not None:
            ctx.hosts.lost_environment(ctx.settings.host_name, name)

    with session_scope(ctx.session_factory) as session:
        return maintenance.purge_local_caches(
            ctx.settings, session, ctx.docker, on_removed_environment=forget
        )


def our_workers(control: Any, queue: str) -> list[str]:
    """The workers consuming this deployment's queue (another deployment, or a test session,
    may share the broker)."""
    replies = control.inspect(timeout=5).active_queues() or {}
    return sorted(w for w, queues in replies.items() if any(q["name"] == queue for q in queues))


def purge_uploads(ctx: PipelineContext) -> dict:
    """Uploads whose URLs expired without a completion, and staged bytes no upload names. One
    at a time per deployment (a lock), like the purge."""
    lock = redis_client(ctx.settings.redis_url).lock(
        cache_keys.upload_purge_lock_name(ctx.settings.queue), timeout=600
    )
    if not lock.acquire(blocking=False):
        return {"skipped": "another purge of uploads is running"}
    try:
        with session_scope(ctx.session_factory) as session:
            count, size = purge.purge_abandoned_uploads(ctx.store, session, ctx.settings)
        with session_scope(ctx.session_factory) as session:
            stray = maintenance.purge_stray_uploads(ctx.store, session)
        metrics.count_removed(metrics.PURGED, metrics.PURGED_BYTES, "uploads", count, size)
        return {"uploads": count, "upload_bytes": size, "stray_uploads": stray}
    finally:
        lock.release()


def purge_caches(ctx: PipelineContext, control: Any) -> dict | None:
    """The nightly purge: the shared part here, once, then every worker host's own disk.
    Returns its result (counts and bytes, also kept for `rgrid cache stats` as the last
    purge), or None when another purge holds the lock."""
    client = redis_client(ctx.settings.redis_url)
    lock = client.lock(cache_keys.purge_lock_name(ctx.settings.queue), timeout=3600)
    if not lock.acquire(blocking=False):
        return None
    try:
        started = time.monotonic()
        shared = _purge_shared(ctx)
        replies = control.broadcast(
            PURGE_LOCAL_COMMAND,
            reply=True,
            timeout=300,
            destination=our_workers(control, ctx.settings.queue),
        )
        hosts = {name: answer for reply in replies or [] for name, answer in reply.items()}
        result = {
            "finished_at": iso_utc(utcnow()),
            "seconds": round(time.monotonic() - started, 3),
            "shared": shared,
            "hosts": hosts,
        }
        client.set(cache_keys.last_purge_key(ctx.settings.queue), json.dumps(result))
        return result
    finally:
        lock.release()


def _purge_shared(ctx: PipelineContext) -> dict:
    """What the deployment's hosts share: rows, blobs, uploads, old executions, and the
    stored uploads and packs that no row names."""
    shared = purge.purge_shared(ctx.settings, ctx.session_factory, ctx.store)
    with session_scope(ctx.session_factory) as session:
        shared["stray_uploads"] = maintenance.purge_stray_uploads(ctx.store, session)
    with session_scope(ctx.session_factory) as session:
        shared["stray_packs"] = maintenance.purge_stray_packs(ctx.store, session, ctx.settings)
    return shared
