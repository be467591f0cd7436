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


def create_celery_app(include: Iterable[str] = ()) -> Celery:
    """A Celery app configured by celeryconfig.py; ``include``: the task modules a worker
    imports when it starts (none for a process that only sends)."""
    app = Celery("rgrid", include=list(include))
    app.config_from_object("celeryconfig")
    return app


def enqueue_pipeline(app: Celery, execution_id: str) -> None:
    """Queue the chain; call only after the transaction that wrote the row has committed."""
    # Each step names its execution in its own arguments (immutable signatures), so Flower
    # shows the execution id on every step from the moment it is queued, and no step depends
    # on what the one before it returned.
    chain(
        *(app.signature(name, args=(execution_id,), immutable=True) for name in PIPELINE)
    ).apply_async()
