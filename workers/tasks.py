"""Pipeline steps as Celery tasks (one per step, so each shows in Flower), the beat jobs, and the
worker's signal handlers. Thin on purpose: where a step runs is rgrid/service/routing.py, which
queues a host serves and its heartbeats rgrid/host/placement.py, the purges
rgrid/service/purge_jobs.py; this module declares the tasks (their names from
rgrid/core/queueing.py) and wires those in."""

from __future__ import annotations

import threading
from functools import lru_cache

import botocore.exceptions
import redis.exceptions
from celery import Task
from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.log import get_task_logger
from celery.worker.control import control_command
from sqlalchemy.exc import OperationalError

from rgrid.core import metrics, queueing
from rgrid.core.config import DEFAULT_RUNTIME, get_settings
from rgrid.core.db import forget_engines_after_fork, session_scope
from rgrid.core.errors import ServiceUnavailable
from rgrid.host import disk, placement, pool
from rgrid.host.hosts import HostRegistry
from rgrid.pipeline.build import build_step
from rgrid.pipeline.chain import crashed, run_and_store_step
from rgrid.pipeline.claim import warm_up
from rgrid.pipeline.context import PipelineContext
from rgrid.pipeline.hash import hash_step
from rgrid.pipeline.lookup import cache_lookup_step
from rgrid.pipeline.lost import sweep_lost_workers
from rgrid.pipeline.store import store_step
from rgrid.service import batches, purge_jobs, routing
from rgrid.service.context import redis_client, server_context
from rgrid.service.maintenance import reap_containers, sweep_lost_executions
from workers.celery_app import app

log = get_task_logger(__name__)


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
        crashed(worker_context(), execution_id, exc, step)
        _hand_on(execution_id)


#: Task name -> the pipeline step it runs (its name says what failed, in user's words).
_STEP_OF_TASK: dict[str, str] = {}


def _enqueue(execution_id: str) -> None:
    queueing.enqueue_pipeline(app, execution_id)


def _hand_on(execution_id: str) -> None:
    """The execution may have ended: if its batch holds executions back, queue the next. A
    failure here only delays them until beat's dispatch job."""
    try:
        batches.after_execution(worker_context().session_factory, execution_id, _enqueue)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not dispatch the batch of %s", execution_id)


def _step(name: str, fn):
    """The Celery task for pipeline step ``fn``, named ``name``: where it runs is routing's
    to decide; after the run or the store step the execution's batch may hand on."""

    @app.task(name=name, base=PipelineTask, bind=True)
    def task(self, execution_id: str) -> str:
        ran = routing.run_step(app, self, worker_context(), name, fn, execution_id)
        if ran and name in (queueing.RUN, queueing.STORE):
            _hand_on(execution_id)
        return execution_id

    _STEP_OF_TASK[name] = fn.__name__
    return task


# Queued by name (rgrid/core/queueing.py builds the chain), so the API never imports this module.
hash_task = _step(queueing.HASH, hash_step)
cache_lookup_task = _step(queueing.CACHE_LOOKUP, cache_lookup_step)
build_task = _step(queueing.BUILD, build_step)
run_task = _step(queueing.RUN, run_and_store_step)
store_task = _step(queueing.STORE, store_step)


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
    # The build pool shares its host's folder: only the run pool, which serves it, empties it.
    if folder is not None and get_settings().worker_pool != "build":
        metrics.fresh_multiprocess_dir(folder)


@worker_process_shutdown.connect
def forget_process_metrics(pid=None, **_kwargs) -> None:
    metrics.process_exited(pid)


def _warm_sandbox_count(ctx: PipelineContext) -> int:
    return len(pool.warm_sandboxes(ctx.docker, installation=pool.installation_id(ctx.pool)))


@worker_ready.connect
def serve_metrics(**_kwargs) -> None:
    """This host's exporter, in the main process (see rgrid/core/metrics.py for why an exporter
    per host): every pool process's counters, this host's disk and warm pool. A port in use
    only costs the metrics, never the worker."""
    settings = get_settings()
    if not settings.worker_metrics_port:
        return
    ctx = server_context(settings)
    collector = metrics.HostCacheCollector(
        lambda: disk.usage(settings), lambda: _warm_sandbox_count(ctx)
    )
    try:
        metrics.serve_worker_metrics(
            settings.worker_metrics_port, collector, settings.worker_metrics_address
        )
    except OSError:
        log.exception("could not serve metrics on port %d", settings.worker_metrics_port)


def _registry() -> HostRegistry:
    settings = get_settings()
    return HostRegistry(redis_client(settings.redis_url), settings.queue)


#: Whether this worker consumes the shared queue as it starts: not when its host is drained
#: (set before the worker's first message, read by the engine watch).
_CONSUMING_AT_START = [True]


@celeryd_after_setup.connect
def consume_host_queue(sender: str, instance, **_kwargs) -> None:
    """Every run pool worker also consumes its host's own queue, and a drained host's stays
    off the shared one (``placement.select_queues``)."""
    settings = get_settings()
    if settings.worker_pool == "build":
        return  # started with -Q on its host's build queue, and only that
    queues = instance.app.amqp.queues
    _CONSUMING_AT_START[0] = placement.select_queues(queues, settings, _registry())


_ENGINE_WATCH_STOP = threading.Event()


@worker_ready.connect
def start_engine_watch(sender=None, **_kwargs) -> None:
    """The run pool's main process watches its host's engine (``placement.watch_engine``)."""
    nodename = getattr(sender, "hostname", None)
    if nodename and get_settings().worker_pool != "build":  # the run pool's job
        args = (app.control, _registry(), get_settings(), nodename, _CONSUMING_AT_START[0])
        threading.Thread(
            target=placement.watch_engine, args=(*args, _ENGINE_WATCH_STOP), daemon=True
        ).start()


@worker_shutdown.connect
def stop_engine_watch(**_kwargs) -> None:
    _ENGINE_WATCH_STOP.set()


_BUILD_POOL_BEAT_STOP = threading.Event()
_BUILD_POOL_BEAT: list[threading.Thread] = []


@worker_ready.connect
def start_build_pool_beat(**_kwargs) -> None:
    """The build pool's main process says it is there (``placement.beat_build_pool``)."""
    if get_settings().worker_pool != "build":
        return
    args = (_registry(), get_settings(), _BUILD_POOL_BEAT_STOP)
    thread = threading.Thread(target=placement.beat_build_pool, args=args, daemon=True)
    thread.start()
    _BUILD_POOL_BEAT.append(thread)


@worker_shutting_down.connect
def build_pool_stopping(**_kwargs) -> None:
    """At the stop signal, before the warm shutdown waits for the installs under way: the
    run pool hands this host no new one (only an event set: this runs in a signal handler)."""
    _BUILD_POOL_BEAT_STOP.set()


@worker_shutdown.connect
def stop_build_pool_beat(**_kwargs) -> None:
    _BUILD_POOL_BEAT_STOP.set()
    for thread in _BUILD_POOL_BEAT:
        thread.join(timeout=5)


@worker_ready.connect
def fill_warm_pool(**_kwargs) -> None:
    """A worker host starts with sandboxes already waiting for the default runtime, so even
    its first run is warm. A failure here only makes that run cold. Runs in the main
    process, with a context of its own that pool processes never inherit. The run pool's
    job: the build pool runs no script."""
    if get_settings().worker_pool == "build":
        return
    try:
        started = warm_up(server_context(get_settings()), DEFAULT_RUNTIME)
        log.info("warm pool: started %d sandbox(es) for %s", started, DEFAULT_RUNTIME)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not fill the warm pool")


@app.task(name=queueing.HOST_MAINTENANCE)
def host_maintenance_task() -> dict[str, list[str]]:
    """On one host, from its own queue: reap its engine's leftover containers."""
    ctx = worker_context()
    with session_scope(ctx.session_factory) as session:
        reaped = reap_containers(
            ctx.docker, session, ctx.settings.sandboxes_dir, ctx.settings.log_journal_dir
        )
    return {"reaped": reaped}


@app.task(name=queueing.REAP_CONTAINERS)
def reap_containers_task() -> dict[str, list[str]]:
    """Every few minutes: executions nobody will finish, then containers nobody will collect
    on every host (each reaps its own engine)."""
    ctx = worker_context()
    with session_scope(ctx.session_factory) as session:
        lost = sweep_lost_executions(session)
    hosts = routing.send_to_every_host(app, ctx, queueing.HOST_MAINTENANCE)
    if not hosts:  # no host has said it is alive yet: reap this one at least
        with session_scope(ctx.session_factory) as session:
            reap_containers(
                ctx.docker, session, ctx.settings.sandboxes_dir, ctx.settings.log_journal_dir
            )
    return {"lost": lost, "hosts": hosts}


@app.task(name=queueing.DISPATCH_BATCHES)
def dispatch_batches_task() -> list[str]:
    """Every lease: batches whose next executions nobody handed on."""
    return batches.dispatch_stalled(worker_context().session_factory, _enqueue)


@app.task(name=queueing.SWEEP_LOST_WORKERS)
def sweep_lost_workers_task() -> dict[str, list[str]]:
    """Twice per lease: running executions whose worker stopped renewing it, and waiting ones
    pinned to a host that is gone."""
    ctx = worker_context()
    lost = sweep_lost_workers(ctx, resend=_resend_run)
    return {"lost": lost, "moved": routing.rescue_stranded(app, ctx)}


def _resend_run(execution_id: str, host: str | None) -> None:
    routing.resend_run(app, get_settings().queue, execution_id, host)


@control_command(name=purge_jobs.PURGE_LOCAL_COMMAND)
def purge_local_command(_state) -> dict:
    """Run by each worker's main process when the purge broadcasts it: each host purges its
    own disk, and replies with what it removed."""
    try:
        return {"ok": purge_jobs.purge_local_caches(worker_context())}
    except Exception as exc:  # noqa: BLE001 - the reply says so; the other hosts go on
        log.exception("local purge failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


@app.task(name=queueing.PURGE_UPLOADS, ignore_result=False)
def purge_uploads_task() -> dict:
    """Every 10 minutes (celeryconfig.py): uploads whose URLs expired without a completion,
    and staged bytes no upload names (``purge_jobs.purge_uploads``)."""
    return purge_jobs.purge_uploads(worker_context())


@app.task(name=queueing.PURGE_CACHES, ignore_result=False)
def purge_caches_task() -> dict:
    """Nightly; exactly one beat should run, but the lock makes a second one harmless
    (``purge_jobs.purge_caches``). The result (counts and bytes) shows in Flower, and in
    `rgrid cache stats` as the last purge."""
    result = purge_jobs.purge_caches(worker_context(), app.control)
    if result is None:
        log.info("another purge is running")
        return {"skipped": "another purge is running"}
    return result
