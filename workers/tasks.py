"""Pipeline steps as Celery tasks (one per step, so each shows in Flower) and the beat jobs."""

from __future__ import annotations

import json
import time
from functools import lru_cache

import botocore.exceptions
import redis.exceptions
from celery import Task
from celery.exceptions import Ignore
from celery.signals import celeryd_init, worker_process_init, worker_process_shutdown, worker_ready
from celery.utils.log import get_task_logger
from celery.worker.control import control_command
from sqlalchemy.exc import OperationalError

from rgrid import cache_keys, disk, maintenance, metrics, pipeline, pool, purge, queueing
from rgrid.config import DEFAULT_RUNTIME, get_settings
from rgrid.context import redis_client, server_context
from rgrid.db import forget_engines_after_fork, session_scope
from rgrid.errors import ServiceUnavailable
from rgrid.maintenance import reap_containers, sweep_lost_executions
from rgrid.models import iso_utc, utcnow
from rgrid.pipeline import PipelineContext
from rgrid.slots import AccountBusy
from workers.celery_app import app

log = get_task_logger(__name__)

#: The remote-control command each worker runs for the purge's per-host part.
PURGE_LOCAL_COMMAND = "rgrid_purge_local"


@lru_cache(maxsize=1)
def worker_context() -> PipelineContext:
    """Built once per worker process, on first use."""
    return server_context(get_settings())


#: Failures of a service that comes back (a restart, a blip): the step is retried with
#: backoff, since every step is idempotent; only when retries run out does it end the
#: execution, naming the service.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ServiceUnavailable,
    OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
)


class PipelineTask(Task):
    """A step of an execution's chain. A transient service error retries the step (about a
    minute in all); any other error, or one that outlasts the retries, ends the execution in
    ``error``."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 1
    retry_backoff_max = 20
    retry_jitter = True
    max_retries = 6

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        execution_id = args[0] if args else kwargs.get("execution_id")
        if not execution_id:
            return
        step = _STEP_OF_TASK.get(self.name, self.name)
        pipeline.crashed(worker_context(), execution_id, exc, step)


#: Task name -> the pipeline step it runs (its name says what failed, in user's words).
_STEP_OF_TASK: dict[str, str] = {}


def _step(name: str, fn):
    @app.task(name=name, base=PipelineTask, bind=True)
    def task(self, execution_id: str) -> str:
        try:
            fn(worker_context(), execution_id)
        except AccountBusy as busy:
            # The account is at its limit: send this step (with the rest of the chain) again
            # later and free this worker slot for other accounts' work now. Not a retry:
            # waiting for a slot must not use up the retries kept for service outages.
            self.signature_from_request(countdown=busy.retry_s, retries=0).apply_async()
            raise Ignore() from None
        return execution_id

    _STEP_OF_TASK[name] = fn.__name__
    return task


# Queued by name (rgrid/queueing.py builds the chain), so the API never imports this module.
hash_task = _step(queueing.HASH, pipeline.hash_step)
cache_lookup_task = _step(queueing.CACHE_LOOKUP, pipeline.cache_lookup_step)
build_task = _step(queueing.BUILD, pipeline.build_step)
run_task = _step(queueing.RUN, pipeline.run_and_store_step)
store_task = _step(queueing.STORE, pipeline.store_step)


@worker_process_init.connect
def fresh_context(**_kwargs) -> None:
    """A pool process forked from the main one must not share its database connections,
    Redis or Docker sockets: it builds its own on first use (SQLAlchemy's advice for forks:
    dispose inherited pools without closing the parent's connections)."""
    forget_engines_after_fork()
    redis_client.cache_clear()
    worker_context.cache_clear()
    metrics.define()


@celeryd_init.connect
def fresh_metrics(**_kwargs) -> None:
    """Before the pool processes start: forget the metric files of this host's earlier
    start (they would be counted again)."""
    folder = metrics.multiprocess_dir()
    if folder is not None:
        metrics.fresh_multiprocess_dir(folder)


@worker_process_shutdown.connect
def forget_process_metrics(pid=None, **_kwargs) -> None:
    metrics.process_exited(pid)


def _warm_count(ctx: PipelineContext) -> int:
    return len(pool._warm(ctx.docker, installation=pool._installation(ctx.pool)))


@worker_ready.connect
def serve_metrics(**_kwargs) -> None:
    """This host's exporter, in the main process (see rgrid/metrics.py for why an exporter
    per host): every pool process's counters, this host's disk and warm pool. A port in use
    only costs the metrics, never the worker."""
    settings = get_settings()
    if not settings.worker_metrics_port:
        return
    ctx = server_context(settings)
    collector = metrics.HostCacheCollector(lambda: disk.usage(settings), lambda: _warm_count(ctx))
    try:
        metrics.serve_worker_metrics(
            settings.worker_metrics_port, collector, settings.worker_metrics_address
        )
    except OSError:
        log.exception("could not serve metrics on port %d", settings.worker_metrics_port)


@worker_ready.connect
def warm_pool(**_kwargs) -> None:
    """A worker host starts with sandboxes already waiting for the default runtime, so even
    its first run is warm. A failure here only makes that run cold. Runs in the main
    process, with a context of its own that pool processes never inherit."""
    try:
        started = pipeline.warm_up(server_context(get_settings()), DEFAULT_RUNTIME)
        log.info("warm pool: started %d sandbox(es) for %s", started, DEFAULT_RUNTIME)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not fill the warm pool")


@app.task(name=queueing.REAP_CONTAINERS)
def reap_containers_task() -> dict[str, list[str]]:
    """Every few minutes: containers nobody will collect, executions nobody will finish."""
    ctx = worker_context()
    with session_scope(ctx.session_factory) as session:
        lost = sweep_lost_executions(session)
    with session_scope(ctx.session_factory) as session:
        reaped = reap_containers(ctx.docker, session, ctx.settings.sandboxes_dir)
    return {"reaped": reaped, "lost": lost}


@app.task(name=queueing.SWEEP_LOST_WORKERS)
def sweep_lost_workers_task() -> list[str]:
    """Twice per lease: running executions whose worker stopped renewing it."""
    return pipeline.sweep_lost_workers(worker_context())


def purge_local_caches() -> dict:
    """This host's part of the purge (rgrid/maintenance.py): the hook every worker host runs,
    whichever way it is asked (the broadcast below, or a per-host queue)."""
    ctx = worker_context()
    with session_scope(ctx.session_factory) as session:
        return maintenance.purge_local_caches(ctx.settings, session, ctx.docker)


@control_command(name=PURGE_LOCAL_COMMAND)
def purge_local_command(_state) -> dict:
    """Run by each worker's main process when the purge broadcasts it: each host purges its
    own disk, and replies with what it removed."""
    try:
        return {"ok": purge_local_caches()}
    except Exception as exc:  # noqa: BLE001 - the reply says so; the other hosts go on
        log.exception("local purge failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _our_workers() -> list[str]:
    """The workers consuming this deployment's queue (another deployment, or a test session,
    may share the broker)."""
    queue = get_settings().queue
    replies = app.control.inspect(timeout=5).active_queues() or {}
    return sorted(w for w, queues in replies.items() if any(q["name"] == queue for q in queues))


@app.task(name=queueing.PURGE_CACHES)
def purge_caches_task() -> dict:
    """Nightly; exactly one beat should run, but the lock makes a second one harmless. The
    shared part (rows, blobs, uploads, old executions) runs here once; then every worker host
    purges its own disk. The result (counts and bytes) shows in Flower, and in
    `rgrid cache stats` as the last purge."""
    ctx = worker_context()
    client = redis_client(ctx.settings.redis_url)
    lock = client.lock(cache_keys.purge_lock_name(ctx.settings.queue), timeout=3600)
    if not lock.acquire(blocking=False):
        log.info("another purge is running")
        return {"skipped": "another purge is running"}
    try:
        started = time.monotonic()
        shared = purge.purge_shared(ctx.settings, ctx.session_factory, ctx.store)
        with session_scope(ctx.session_factory) as session:
            shared["stray_uploads"] = maintenance.purge_stray_uploads(ctx.store, session)
        replies = app.control.broadcast(
            PURGE_LOCAL_COMMAND, reply=True, timeout=300, destination=_our_workers()
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
