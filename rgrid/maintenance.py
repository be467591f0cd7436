"""Keeping the grid bounded: reaping leftover containers and purging unused cache entries."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta

import docker
from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.docker_engine import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.models import TERMINAL_STATUSES, Execution, ScriptCache, utcnow

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


def reap_containers(client: docker.DockerClient, session: Session) -> list[str]:
    """Remove execution containers (and volumes) that nobody will ever collect.

    A killed worker process does not stop its container; this is what stops it.
    """
    removed = []
    now = time.time()
    for container in client.containers.list(all=True, filters={"label": MANAGED_LABEL}):
        execution_id = container.labels.get(EXECUTION_LABEL)
        if not execution_id:
            continue
        if not _abandoned(container.labels, session.get(Execution, execution_id), now):
            continue
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:  # already gone, or being removed by its runner
            log.info("could not reap %s: %s", execution_id, exc)
            continue
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
