"""Where an execution's steps run: this host, its build pool, or another host.

The first step of an execution that touches Docker pins the execution to its host
(``hosts.claim``) and the steps after it follow to that host's own queue, so the run finds the
environment the build installed; a build that installs goes to the host's build pool, whose
slots are its own; a host whose engine is lost hands the step on to the shared queue; an
execution pinned to a host that is gone is moved to a live one. After the cache lookup, a live
host that already has the execution's environment is preferred.

Each function is handed the Celery app it sends through, or the running task whose chain it
routes (a task's ``request.chain``, read by Celery once the task returns): this layer never
imports the worker's task module (workers/tasks.py), which calls in here.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable

from celery import Celery, Task
from celery.exceptions import Ignore

from rgrid.core import lifecycle, queueing
from rgrid.core.db import session_scope
from rgrid.core.models import Execution
from rgrid.host import hosts, placement
from rgrid.host.docker_engine import engine_accepts, engine_answers
from rgrid.host.hosts import build_queue, host_queue
from rgrid.host.slots import AccountBusy
from rgrid.pipeline.build import build_installs
from rgrid.pipeline.context import PipelineContext
from rgrid.pipeline.rows import update_execution

log = logging.getLogger(__name__)


def run_step(
    app: Celery,
    task: Task,
    ctx: PipelineContext,
    name: str,
    step: Callable[[PipelineContext, str], object],
    execution_id: str,
) -> bool:
    """Run pipeline ``step`` (task ``name``) of the execution here, or hand it on; True when
    it ran here. A Docker step runs only on the host holding the execution, with an engine
    that answers: otherwise it goes elsewhere. An account at its limit sends the step again
    later, freeing this worker slot (Celery's ``Ignore``: not a retry, which is kept for
    service outages)."""
    docker_step = name in queueing.DOCKER_STEPS
    if docker_step and not _runs_here(app, task, ctx, name, execution_id):
        return False
    try:
        step(ctx, execution_id)
    except AccountBusy as busy:
        # The account is at its limit: send this step (with the rest of the chain) again
        # later and free this worker slot for other accounts' work now. Not a retry:
        # waiting for a slot must not use up the retries kept for service outages.
        if docker_step and not placement.from_own_queue(task.request.delivery_info, ctx.settings):
            # Taken from the shared queue, it goes back there: any host may take it then.
            hosts.release(ctx.session_factory, execution_id, ctx.settings.host_name)
        task.signature_from_request(countdown=busy.retry_s, retries=0).apply_async()
        raise Ignore() from None
    except Exception:
        if docker_step and not engine_answers():
            move_elsewhere(app, task, ctx, execution_id)
            return False
        raise
    if docker_step:
        route_rest_here(task, ctx)
    elif name == queueing.CACHE_LOOKUP:
        prefer_host_with_environment(task, ctx, execution_id)
    return True


def _runs_here(app: Celery, task: Task, ctx: PipelineContext, name: str, execution_id: str) -> bool:
    """Before a Docker step: whether it runs on this host. Not when the engine is down (moved
    on), another host holds the execution (a stale copy, dropped) or the build is one for
    this host's build pool (handed there)."""
    if not engine_accepts():
        move_elsewhere(app, task, ctx, execution_id)
        return False
    if not hosts.claim(ctx.session_factory, execution_id, ctx.settings.host_name):
        log.info("%s: held by another host; dropping this copy", execution_id)
        drop_rest(task)
        return False
    return not (name == queueing.BUILD and to_build_pool(app, task, ctx, execution_id))


def route_rest_here(task: Task, ctx: PipelineContext) -> None:
    """The steps still to come go to this host's queue: the run finds the environment the
    build installed, and the warm pool of sandboxes that build filled."""
    queueing.route_rest(task.request.chain, host_queue(ctx.settings.queue, ctx.settings.host_name))


def to_build_pool(app: Celery, task: Task, ctx: PipelineContext, execution_id: str) -> bool:
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
    rest = drop_rest(task)
    queue = build_queue(ctx.settings.queue, ctx.settings.host_name)
    app.signature(task.name, args=(execution_id,), queue=queue).apply_async(chain=rest)
    return True


def drop_rest(task: Task) -> list[dict] | None:
    """Stop the chain here (Celery reads ``request.chain`` after the task returns)."""
    rest, task.request.chain = task.request.chain, None
    return rest


def prefer_host_with_environment(task: Task, ctx: PipelineContext, execution_id: str) -> None:
    """After the cache lookup: a live host that already has the environment installed takes
    the Docker steps (pinned to it now); with none, they stay on the shared queue for any
    host, and the first to take one pins it."""
    with session_scope(ctx.session_factory) as session:
        environment = session.get(Execution, execution_id).environment
    chosen = ctx.hosts.host_with_environment(environment) if ctx.hosts else None
    if chosen is not None and hosts.claim(ctx.session_factory, execution_id, chosen):
        queueing.route_rest(task.request.chain, host_queue(ctx.settings.queue, chosen))


def resend(
    app: Celery, app_queue: str, name: str, execution_id: str, rest: list[dict] | None
) -> None:
    """Queue step ``name`` and the rest of its chain on the shared queue, for any host."""
    queueing.route_rest(rest, app_queue)
    app.signature(name, args=(execution_id,), queue=app_queue).apply_async(chain=rest)


def move_elsewhere(app: Celery, task: Task, ctx: PipelineContext, execution_id: str) -> None:
    """This host's Docker engine is down: hand this step and the rest of the chain to the
    shared queue (another host takes it) instead of failing the execution here. The step is
    idempotent, and a run cut short here left no live sandbox behind (its engine is gone).
    Only the host holding the execution moves it: a stale copy is dropped."""
    host = ctx.settings.host_name
    log.warning("%s: Docker engine of %s is down: moving it", execution_id, host)
    rest = drop_rest(task)
    # Not waiting for the engine watch (up to its interval): the shared queue would hand
    # this very step back here.
    with contextlib.suppress(Exception):
        placement.stop_taking_work(ctx.hosts, app.control, ctx.settings, task.request.hostname)
    if not hosts.release(ctx.session_factory, execution_id, host):
        return  # held by another host: this copy is stale

    # Not lost: on its way to another host.
    update_execution(ctx, execution_id, lifecycle.renew_lease)
    ctx.note(execution_id, f"host {host} lost its Docker engine: moving on")
    resend(app, ctx.settings.queue, task.name, execution_id, rest)


def rescue_stranded(app: Celery, ctx: PipelineContext) -> list[str]:
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


def resend_run(app: Celery, queue: str, execution_id: str, host: str | None) -> None:
    """The run step (and the store step after it) again, to the host whose sandbox runs the
    script: the step there re-attaches to it."""
    queueing.enqueue_from(
        app, queueing.RUN, execution_id, host_queue(queue, host) if host else queue
    )


def send_to_every_host(app: Celery, ctx: PipelineContext, name: str) -> list[str]:
    """Send task ``name`` to every live host's own queue; returns the hosts."""
    live = ctx.hosts.live_hosts() if ctx.hosts else []
    for host in live:
        app.send_task(name, queue=host_queue(ctx.settings.queue, host))
    return live
