"""Which work this worker host takes, and while when: its queues and its heartbeats.

A host's run pool consumes the shared queue and the host's own queue (``hosts.host_queue``);
its build pool consumes only the host's build queue (``hosts.build_queue``). While the host's
Docker engine answers and no operator drains it, the run pool's main process renews the host's
heartbeat (``watch_engine``), so the dispatcher may choose it; when the engine stops answering,
or the host is drained (`rgrid admin drain`), it stops taking from the shared queue, and takes
it up again once that is over. The build pool beats a key of its own (``beat_build_pool``) so
that the run pool hands it installs only while it is there.

The Celery side (the app's remote control, a worker's queue selection) is handed in by the
worker's signal handlers (workers/tasks.py); the registry is built there, on the worker's Redis.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import redis.exceptions

from rgrid.core.config import Settings
from rgrid.host import hosts
from rgrid.host.docker_engine import engine_answers
from rgrid.host.hosts import HEARTBEAT_EVERY_S, HostRegistry, build_queue, host_queue

log = logging.getLogger(__name__)


def select_queues(queues: Any, settings: Settings, registry: HostRegistry) -> bool:
    """At a run pool worker's start: consume this host's own queue too (Celery's documented
    way to add one), through which the steps of executions pinned here come. A drained host's
    worker that starts again (an upgrade, a reboot) stays off the shared queue from its first
    message on, not only from the engine watch's first tick. Returns whether the worker takes
    from the shared queue."""
    queues.select_add(host_queue(settings.queue, settings.host_name))
    try:
        drained = registry.drain_state(settings.host_name) is not None
    except redis.exceptions.RedisError:
        drained = False  # the watch decides once Redis answers
    if drained:
        queues.deselect([settings.queue])
        log.warning("%s is drained: not taking from the shared queue", settings.host_name)
    return not drained


def from_own_queue(delivery_info: dict | None, settings: Settings) -> bool:
    """Whether a step came through one of this host's own queues (not the shared one)."""
    own = (
        host_queue(settings.queue, settings.host_name),
        build_queue(settings.queue, settings.host_name),
    )
    return (delivery_info or {}).get("routing_key") in own


def stop_taking_work(
    registry: HostRegistry | None, control: Any, settings: Settings, nodename: str | None
) -> None:
    """Take this host out of the shared queue and out of the hosts the dispatcher chooses, at
    once (``control``: the Celery app's remote control)."""
    if registry is not None:
        registry.gone(settings.host_name)
    if nodename:
        control.cancel_consumer(settings.queue, destination=[nodename])


def watch_engine(
    control: Any,
    registry: HostRegistry,
    settings: Settings,
    nodename: str,
    consuming: bool,
    stop: threading.Event,
) -> None:
    """In the worker's main process: while this host's Docker engine answers and the host is
    not drained, renew the host's heartbeat; when the engine stops answering, or an operator
    drains the host (`rgrid admin drain`), stop taking from the shared queue (so the host does
    not fail every execution it would receive, or gets no new work) and take it up again
    when it is back. The host's own queue stays consumed: what is pinned here and already
    running finishes here; what is pinned and waiting is moved elsewhere (by the steps
    themselves, ``routing.move_elsewhere``, or by the sweep of hosts without a heartbeat).
    ``consuming``: whether the worker took from the shared queue as it started."""
    host = settings.host_name
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            answers = engine_answers()
            drain = registry.drain_state(host)
            if answers and drain is None:
                # Gone from the registry while answering: a step saw the engine fail and
                # stopped this host taking work; it answers again, so take work again.
                was_alive = registry.alive(host)
                registry.beat(host)
                if not consuming or not was_alive:
                    control.add_consumer(settings.queue, destination=[nodename])
                    log.warning("%s: taking work again", host)
                    consuming = True
                continue
            registry.gone(host)
            if consuming:
                # With a reply: the drain is acknowledged only once the consumer is gone.
                control.cancel_consumer(
                    settings.queue, destination=[nodename], reply=drain is not None, timeout=5
                )
                why = "drained" if drain is not None else "Docker engine down"
                log.warning("%s: %s: no longer taking work", host, why)
                consuming = False
            if drain == hosts.DRAIN_REQUESTED:
                registry.acknowledge_drain(host)
        except Exception:  # noqa: BLE001 - a Redis blip: try again on the next tick
            log.warning("could not check this host's Docker engine", exc_info=True)


def beat_build_pool(registry: HostRegistry, settings: Settings, stop: threading.Event) -> None:
    """In the build pool's main process: say that this host's build queue is consumed, so
    the run pool hands its installs here (``routing.to_build_pool``); once stopped, say so at
    once so the run pool installs in place from its next build on."""
    while True:
        try:
            registry.build_pool_beat(settings.host_name)
        except Exception:  # noqa: BLE001 - a Redis blip: try again on the next tick
            log.warning("could not renew this host's build pool heartbeat", exc_info=True)
        if stop.wait(HEARTBEAT_EVERY_S):
            break
    with contextlib.suppress(Exception):
        registry.build_pool_gone(settings.host_name)
