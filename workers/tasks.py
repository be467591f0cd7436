"""Pipeline steps as Celery tasks (one per step, so each shows in Flower) and the beat jobs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from functools import lru_cache

import botocore.exceptions
import redis.exceptions
from celery import Task
from celery.exceptions import Ignore
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

from rgrid.core import cache_keys, lifecycle, metrics, queueing
from rgrid.core.config import DEFAULT_RUNTIME, get_settings
from rgrid.core.db import forget_engines_after_fork, session_scope
from rgrid.core.errors import ServiceUnavailable
from rgrid.core.models import Execution, iso_utc, utcnow
from rgrid.host import disk, hosts, pool
from rgrid.host.hosts import HEARTBEAT_EVERY_S, HostRegistry, build_queue, host_queue
from rgrid.host.slots import AccountBusy
from rgrid.pipeline.build import build_installs, build_step
from rgrid.pipeline.chain import crashed, run_and_store_step
from rgrid.pipeline.claim import warm_up
from rgrid.pipeline.context import PipelineContext
from rgrid.pipeline.hash import hash_step
from rgrid.pipeline.lookup import cache_lookup_step
from rgrid.pipeline.lost import sweep_lost_workers
from rgrid.pipeline.rows import update_execution
from rgrid.pipeline.store import store_step
from rgrid.service import batches, maintenance, purge
from rgrid.service.context import redis_client, server_context
from rgrid.service.maintenance import reap_containers, sweep_lost_executions
from rgrid.store import uploads
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


def _engine_answers() -> bool:
    """On a new connection: a stopping dockerd closes its socket first but keeps serving the
    connections it has, so the step's own (kept alive) client would still get a ping."""
    import docker

    return _ping(docker)


def _engine_accepts() -> bool:
    """Before a Docker step: whether the engine takes a new connection, which is what tells
    a stopping dockerd (see ``_engine_answers``), for a connect instead of a whole new client
    and a ping (~25 ms a step, measured). An engine that accepts but no longer answers fails
    the step, which then asks ``_engine_answers``."""
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    scheme, _, where = url.partition("://")
    try:
        if scheme == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(3)
                sock.connect(where)
        elif scheme == "tcp":
            host, _, port = where.rstrip("/").rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        else:  # ssh:// and the like: ask the engine itself
            return _engine_answers()
    except (OSError, ValueError):
        return False
    return True


def _route_rest_here(task: Task, ctx: PipelineContext) -> None:
    """The steps still to come go to this host's queue: the run finds the environment the
    build installed, and the warm pool that build filled."""
    queueing.route_rest(task.request.chain, host_queue(ctx.settings.queue, ctx.settings.host_name))


def _from_own_queue(task: Task, ctx: PipelineContext) -> bool:
    """Whether this step came through one of this host's own queues (not the shared one)."""
    settings = ctx.settings
    own = (
        host_queue(settings.queue, settings.host_name),
        build_queue(settings.queue, settings.host_name),
    )
    return (task.request.delivery_info or {}).get("routing_key") in own


def _to_build_pool(task: Task, ctx: PipelineContext, execution_id: str) -> bool:
    """In the run pool, a build that installs a dependency set is handed (with the rest of
    its chain) to this host's build pool, which has slots of its own: an install, up to its
    deadline, never holds a slot that runs need. Returns whether it was handed on."""
    if ctx.settings.worker_pool == "build" or not build_installs(ctx, execution_id):
        return False
    if ctx.hosts is not None and not ctx.hosts.build_pool_alive(ctx.settings.host_name):
        # Nothing consumes this host's build queue: install here, in a run slot, rather
        # than hand the build to a queue where it would wait for ever.
        log.warning(
            "%s: no build pool alive on this host: installing in the run pool", execution_id
        )
        ctx.note(execution_id, "no build pool on this host: installing in a run slot")
        return False
    rest = _drop_rest(task)
    queue = build_queue(ctx.settings.queue, ctx.settings.host_name)
    app.signature(task.name, args=(execution_id,), queue=queue).apply_async(chain=rest)
    return True


def _drop_rest(task: Task) -> list[dict] | None:
    """Stop the chain here (Celery reads ``request.chain`` after the task returns)."""
    rest, task.request.chain = task.request.chain, None
    return rest


def _prefer_warm(task: Task, ctx: PipelineContext, execution_id: str) -> None:
    """After the cache lookup: a live host that already has the environment takes the
    Docker steps (pinned to it now); with none, they stay on the shared queue for any
    host, and the first to take one pins it."""
    with session_scope(ctx.session_factory) as session:
        environment = session.get(Execution, execution_id).environment
    warm = ctx.hosts.warm_host(environment) if ctx.hosts else None
    if warm is not None and hosts.claim(ctx.session_factory, execution_id, warm):
        queueing.route_rest(task.request.chain, host_queue(ctx.settings.queue, warm))


def _resend(app_queue: str, name: str, execution_id: str, rest: list[dict] | None) -> None:
    """Queue step ``name`` and the rest of its chain on the shared queue, for any host."""
    queueing.route_rest(rest, app_queue)
    app.signature(name, args=(execution_id,), queue=app_queue).apply_async(chain=rest)


def _move_elsewhere(task: Task, ctx: PipelineContext, execution_id: str) -> None:
    """This host's Docker engine is down: hand this step and the rest of the chain to the
    shared queue (another host takes it) instead of failing the execution here. The step is
    idempotent, and a run cut short here left no live sandbox behind (its engine is gone).
    Only the host holding the execution moves it: a stale copy is dropped."""
    host = ctx.settings.host_name
    log.warning("%s: Docker engine of %s is down: moving it", execution_id, host)
    rest = _drop_rest(task)
    # Not waiting for the engine watch (up to its interval): the shared queue would hand
    # this very step back here.
    with contextlib.suppress(Exception):
        _stop_taking_work(ctx, task.request.hostname)
    if not hosts.release(ctx.session_factory, execution_id, host):
        return  # held by another host: this copy is stale

    # Not lost: on its way to another host.
    update_execution(ctx, execution_id, lifecycle.renew_lease)
    ctx.note(execution_id, f"host {host} lost its Docker engine: moving on")
    _resend(ctx.settings.queue, task.name, execution_id, rest)


def _step(name: str, fn):
    docker_step = name in queueing.DOCKER_STEPS

    @app.task(name=name, base=PipelineTask, bind=True)
    def task(self, execution_id: str) -> str:
        ctx = worker_context()
        if docker_step:
            if not _engine_accepts():
                _move_elsewhere(self, ctx, execution_id)
                return execution_id
            if not hosts.claim(ctx.session_factory, execution_id, ctx.settings.host_name):
                log.info("%s: held by another host; dropping this copy", execution_id)
                _drop_rest(self)
                return execution_id
            if name == queueing.BUILD and _to_build_pool(self, ctx, execution_id):
                return execution_id
        try:
            fn(ctx, execution_id)
        except AccountBusy as busy:
            # The account is at its limit: send this step (with the rest of the chain) again
            # later and free this worker slot for other accounts' work now. Not a retry:
            # waiting for a slot must not use up the retries kept for service outages.
            if docker_step and not _from_own_queue(self, ctx):
                # Taken from the shared queue, it goes back there: any host may take it then.
                hosts.release(ctx.session_factory, execution_id, ctx.settings.host_name)
            self.signature_from_request(countdown=busy.retry_s, retries=0).apply_async()
            raise Ignore() from None
        except Exception:
            if docker_step and not _engine_answers():
                _move_elsewhere(self, ctx, execution_id)
                return execution_id
            raise
        if docker_step:
            _route_rest_here(self, ctx)
        elif name == queueing.CACHE_LOOKUP:
            _prefer_warm(self, ctx, execution_id)
        if name in (queueing.RUN, queueing.STORE):
            _hand_on(execution_id)
        return execution_id

    _STEP_OF_TASK[name] = fn.__name__
    return task


def rescue_stranded(ctx: PipelineContext) -> list[str]:
    """Executions pinned to a host that is gone (worker and engine) would wait in its queue
    for ever: pin each to a live host and queue its Docker steps again there. The build and
    run steps are idempotent, and a copy left in the dead host's queue finds the execution
    held elsewhere if that host ever comes back, and drops itself."""
    if ctx.hosts is None:
        return []
    live = ctx.hosts.live_hosts()
    moved = []
    for execution_id, host in hosts.pinned_to_lost_hosts(ctx.session_factory, ctx.hosts):
        if not live:
            break  # nowhere to go yet: the next sweep tries again
        to = random.choice(live)
        if hosts.move(ctx.session_factory, execution_id, host, to):
            ctx.note(execution_id, f"host {host} is gone: moving to {to}")
            queue = host_queue(ctx.settings.queue, to)
            queueing.enqueue_from(app, queueing.BUILD, execution_id, queue)
            moved.append(execution_id)
    return moved


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


def _warm_count(ctx: PipelineContext) -> int:
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
    collector = metrics.HostCacheCollector(lambda: disk.usage(settings), lambda: _warm_count(ctx))
    try:
        metrics.serve_worker_metrics(
            settings.worker_metrics_port, collector, settings.worker_metrics_address
        )
    except OSError:
        log.exception("could not serve metrics on port %d", settings.worker_metrics_port)


#: Whether this worker consumes the shared queue as it starts: not when its host is drained
#: (set before the worker's first message, read by the engine watch).
_CONSUMING_AT_START = [True]


@celeryd_after_setup.connect
def consume_host_queue(sender: str, instance, **_kwargs) -> None:
    """Every worker also consumes its host's own queue (Celery's documented way to add one):
    the steps of executions pinned to this host come through it. A drained host's worker
    that starts again (an upgrade, a reboot) stays off the shared queue from its first
    message on, not only from the engine watch's first tick."""
    settings = get_settings()
    if settings.worker_pool == "build":
        return  # started with -Q on its host's build queue, and only that
    queues = instance.app.amqp.queues
    queues.select_add(host_queue(settings.queue, settings.host_name))
    try:
        registry = HostRegistry(redis_client(settings.redis_url), settings.queue)
        drained = registry.drain_state(settings.host_name) is not None
    except redis.exceptions.RedisError:
        drained = False  # the watch decides once Redis answers
    if drained:
        queues.deselect([settings.queue])
        _CONSUMING_AT_START[0] = False
        log.warning("%s is drained: not taking from the shared queue", settings.host_name)


def _ping(docker) -> bool:
    try:
        client = docker.from_env(timeout=3)
    except Exception:  # noqa: BLE001 - no socket at all: not answering
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure is "not answering"
        return False
    finally:
        client.close()


def _stop_taking_work(ctx: PipelineContext, nodename: str | None) -> None:
    """Take this host out of the shared queue and out of the warm hosts, at once."""
    if ctx.hosts is not None:
        ctx.hosts.gone(ctx.settings.host_name)
    if nodename:
        app.control.cancel_consumer(ctx.settings.queue, destination=[nodename])


def watch_engine(nodename: str, stop: threading.Event) -> None:
    """In the worker's main process: while this host's Docker engine answers and the host is
    not drained, renew the host's heartbeat; when the engine stops answering, or an operator
    drains the host (`rgrid admin drain`), stop taking from the shared queue (so the host does
    not fail every execution it would receive, or gets no new work) and take it up again
    when it is back. The host's own queue stays consumed: what is pinned here and already
    running finishes here; what is pinned and waiting is moved elsewhere (by the steps
    themselves, ``_move_elsewhere``, or by the sweep of hosts without a heartbeat)."""
    import docker

    settings = get_settings()
    registry = HostRegistry(redis_client(settings.redis_url), settings.queue)
    host, consuming = settings.host_name, _CONSUMING_AT_START[0]
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            answers = _ping(docker)
            drain = registry.drain_state(host)
            if answers and drain is None:
                # Gone from the registry while answering: a step saw the engine fail and
                # stopped this host taking work; it answers again, so take work again.
                was_alive = registry.alive(host)
                registry.beat(host)
                if not consuming or not was_alive:
                    app.control.add_consumer(settings.queue, destination=[nodename])
                    log.warning("%s: taking work again", host)
                    consuming = True
                continue
            registry.gone(host)
            if consuming:
                # With a reply: the drain is acknowledged only once the consumer is gone.
                app.control.cancel_consumer(
                    settings.queue, destination=[nodename], reply=drain is not None, timeout=5
                )
                why = "drained" if drain is not None else "Docker engine down"
                log.warning("%s: %s: no longer taking work", host, why)
                consuming = False
            if drain == hosts.DRAIN_REQUESTED:
                registry.acknowledge_drain(host)
        except Exception:  # noqa: BLE001 - a Redis blip: try again on the next tick
            log.warning("could not check this host's Docker engine", exc_info=True)


_ENGINE_WATCH_STOP = threading.Event()


@worker_ready.connect
def start_engine_watch(sender=None, **_kwargs) -> None:
    nodename = getattr(sender, "hostname", None)
    if nodename and get_settings().worker_pool != "build":  # the run pool's job
        threading.Thread(
            target=watch_engine, args=(nodename, _ENGINE_WATCH_STOP), daemon=True
        ).start()


@worker_shutdown.connect
def stop_engine_watch(**_kwargs) -> None:
    _ENGINE_WATCH_STOP.set()


def beat_build_pool(stop: threading.Event) -> None:
    """In the build pool's main process: say that this host's build queue is consumed, so
    the run pool hands its installs here (``_to_build_pool``); once stopped, say so at once
    so the run pool installs in place from its next build on."""
    settings = get_settings()
    registry = HostRegistry(redis_client(settings.redis_url), settings.queue)
    while True:
        try:
            registry.build_pool_beat(settings.host_name)
        except Exception:  # noqa: BLE001 - a Redis blip: try again on the next tick
            log.warning("could not renew this host's build pool heartbeat", exc_info=True)
        if stop.wait(HEARTBEAT_EVERY_S):
            break
    with contextlib.suppress(Exception):
        registry.build_pool_gone(settings.host_name)


_BUILD_POOL_BEAT_STOP = threading.Event()
_BUILD_POOL_BEAT: list[threading.Thread] = []


@worker_ready.connect
def start_build_pool_beat(**_kwargs) -> None:
    if get_settings().worker_pool != "build":
        return
    thread = threading.Thread(target=beat_build_pool, args=(_BUILD_POOL_BEAT_STOP,), daemon=True)
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
def warm_pool(**_kwargs) -> None:
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


def _every_host(ctx: PipelineContext) -> list[str]:
    """Send the host maintenance to every live host's own queue; returns the hosts."""
    live = ctx.hosts.live_hosts() if ctx.hosts else []
    for host in live:
        app.send_task(queueing.HOST_MAINTENANCE, queue=host_queue(ctx.settings.queue, host))
    return live


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
    hosts = _every_host(ctx)
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
    return {"lost": lost, "moved": rescue_stranded(ctx)}


def _resend_run(execution_id: str, host: str | None) -> None:
    """The run step (and the store step after it) again, to the host whose sandbox runs the
    script: the step there re-attaches to it."""
    queue = get_settings().queue
    queueing.enqueue_from(
        app, queueing.RUN, execution_id, host_queue(queue, host) if host else queue
    )


def purge_local_caches() -> dict:
    """This host's part of the purge (rgrid/service/maintenance.py): the hook every worker host runs
    when the purge broadcasts it. Environments it removes stop counting as warm here."""
    ctx = worker_context()

    def forget(name: str) -> None:
        if ctx.hosts is not None:
            ctx.hosts.lost_environment(ctx.settings.host_name, name)

    with session_scope(ctx.session_factory) as session:
        return maintenance.purge_local_caches(
            ctx.settings, session, ctx.docker, on_removed_environment=forget
        )


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


@app.task(name=queueing.PURGE_UPLOADS, ignore_result=False)
def purge_uploads_task() -> dict:
    """Every 10 minutes (celeryconfig.py): uploads whose URLs expired without a completion,
    and staged bytes no upload names. One at a time per deployment (a lock), like the purge."""
    ctx = worker_context()
    lock = redis_client(ctx.settings.redis_url).lock(
        cache_keys.upload_purge_lock_name(ctx.settings.queue), timeout=600
    )
    if not lock.acquire(blocking=False):
        return {"skipped": "another purge of uploads is running"}
    try:
        with session_scope(ctx.session_factory) as session:
            count, size = uploads.purge_abandoned_uploads(ctx.store, session, ctx.settings)
        with session_scope(ctx.session_factory) as session:
            stray = maintenance.purge_stray_uploads(ctx.store, session)
        metrics.count_removed(metrics.PURGED, metrics.PURGED_BYTES, "uploads", count, size)
        return {"uploads": count, "upload_bytes": size, "stray_uploads": stray}
    finally:
        lock.release()


@app.task(name=queueing.PURGE_CACHES, ignore_result=False)
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
        with session_scope(ctx.session_factory) as session:
            shared["stray_packs"] = maintenance.purge_stray_packs(ctx.store, session, ctx.settings)
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
