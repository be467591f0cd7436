"""Work queued by task name: the Celery task names, the pipeline's chain and the Celery app
that sends them. The API queues work through here without importing the tasks themselves
(and with them the pipeline, the builder and docker-py); workers/tasks.py registers a task
under each name, and celeryconfig.py schedules the beat jobs by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery, chain

#: The pipeline's steps, in the order the chain runs them (one Celery task each, so each shows
#: in Flower). The run task also stores the result; the store task then finds it done.
HASH = "rgrid.hash"
CACHE_LOOKUP = "rgrid.cache_lookup"
BUILD = "rgrid.build"
RUN = "rgrid.run"
STORE = "rgrid.store"
PIPELINE = (HASH, CACHE_LOOKUP, BUILD, RUN, STORE)

#: Beat's jobs.
SWEEP_LOST_WORKERS = "rgrid.sweep_lost_workers"
REAP_CONTAINERS = "rgrid.reap_containers"
PURGE_CACHES = "rgrid.purge_caches"
DISPATCH_BATCHES = "rgrid.dispatch_batches"
PURGE_UPLOADS = "rgrid.purge_abandoned_uploads"
#: Sent by the reaper and the purge to every live host's own queue: the part of each that only
#: that host holds (its engine's containers, its environment folders).
HOST_MAINTENANCE = "rgrid.host_maintenance"


def create_celery_app(include: Iterable[str] = ()) -> Celery:
    """A Celery app configured by celeryconfig.py; ``include``: the task modules a worker
    imports when it starts (none for a process that only sends)."""
    app = Celery("rgrid", include=list(include))
    app.config_from_object("celeryconfig")
    return app


#: The steps that touch the Docker engine: all of one execution's run on one host.
DOCKER_STEPS = (BUILD, RUN)


def route_rest(rest: list[dict] | None, queue: str) -> None:
    """Send the steps still to come of a chain (a task's ``request.chain``: signatures as
    dicts, the next one last) to ``queue``. Celery reads that list after the task returns,
    so changing it in place routes what follows."""
    for signature in rest or ():
        signature.setdefault("options", {})["queue"] = queue


def enqueue_pipeline(app: Celery, execution_id: str) -> None:
    """Queue the chain; call only after the transaction that wrote the row has committed."""
    enqueue_from(app, PIPELINE[0], execution_id)


def enqueue_from(app: Celery, step: str, execution_id: str, queue: str | None = None) -> None:
    """Queue the chain from ``step`` on (an execution moved off a lost host starts again at
    its build step), on ``queue`` or the default one. Each step names its execution in its
    own arguments (immutable signatures), so Flower shows the execution id on every step
    from the moment it is queued, and no step depends on what the one before it returned."""
    options = {"queue": queue} if queue else {}
    chain(
        *(
            app.signature(name, args=(execution_id,), immutable=True, **options)
            for name in PIPELINE[PIPELINE.index(step) :]
        )
    ).apply_async()
