"""Keeping the grid bounded: reaping leftover containers and purging unused cache entries."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

import docker
from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.docker_engine import EXECUTION_LABEL, MANAGED_LABEL
from rgrid.models import TERMINAL_STATUSES, Execution, ScriptCache, utcnow

log = logging.getLogger(__name__)

UNUSED_AFTER = timedelta(days=30)


def reap_containers(client: docker.DockerClient, session: Session) -> list[str]:
    """Remove execution containers (and volumes) whose execution is over or unknown.

    A killed worker process does not stop its container; this is what stops it.
    """
    removed = []
    for container in client.containers.list(all=True, filters={"label": MANAGED_LABEL}):
        execution_id = container.labels.get(EXECUTION_LABEL)
        if not execution_id:
            continue
        execution = session.get(Execution, execution_id)
        if execution is not None and execution.status not in TERMINAL_STATUSES:
            continue
        container.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(f"rgrid-work-{execution_id}").remove(force=True)
        removed.append(execution_id)
    return removed


def purge_script_cache(client: docker.DockerClient, session: Session) -> int:
    """Drop script-cache rows unused for 30 days, and the images only they referenced."""
    cutoff = utcnow() - UNUSED_AFTER
    stale = list(session.scalars(select(ScriptCache).where(ScriptCache.last_used_at < cutoff)))
    for row in stale:
        session.delete(row)
    session.flush()
    still_used = set(session.scalars(select(ScriptCache.image_ref)))
    for row in stale:
        if row.image_ref in still_used:
            continue
        try:
            client.images.remove(row.image_ref, noprune=False)
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:  # in use by a running container: next night
            log.warning("could not remove %s: %s", row.image_ref, exc)
    return len(stale)
