"""Worker hosts of one deployment: which are alive, which hold which environment, and the
queue of each.

A worker host is one Docker engine with the Celery worker(s) bound to it and its own local
caches (environments, warm pool, blob and uv caches). Each host's worker consumes the shared
queue and a queue of its own (:func:`host_queue`): the first step of an execution that touches
Docker pins the execution to its host and sends the remaining steps to that host's queue, so
an environment is installed where the script then runs. Before that, the dispatcher prefers
a live host that already has the execution's environment installed
(:meth:`HostRegistry.host_with_environment`).

All of it lives in Redis under the deployment's queue name (test sessions have their own),
with a heartbeat key per host that expires when the host stops renewing it: a host whose
worker died, or whose Docker engine stopped answering, is no longer chosen.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.models import Execution
from rgrid.core.statuses import Status

if TYPE_CHECKING:
    import redis

#: A host renews its heartbeat this often, and is taken for gone once it is this old.
HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_TTL_S = 10


DRAIN_REQUESTED = "requested"
DRAINED = "drained"


def host_queue(queue: str, host: str) -> str:
    """The Celery queue only ``host``'s workers consume."""
    return f"{queue}.host.{host}"


def build_queue(queue: str, host: str) -> str:
    """The Celery queue only ``host``'s build pool consumes: dependency installs, so that
    they never hold the host's run slots (see rgrid/host/slots.py)."""
    return f"{queue}.build.{host}"


class HostRegistry:
    """The deployment's view of its hosts, in Redis."""

    def __init__(self, client: redis.Redis, queue: str):
        self.client = client
        self.queue = queue

    def _alive_key(self, host: str) -> str:
        return cache_keys.host_alive_key(self.queue, host)

    def _env_key(self, environment: str) -> str:
        return cache_keys.environment_hosts_key(self.queue, environment)

    def beat(self, host: str) -> None:
        """This host's engine answers: keep it choosable for another TTL."""
        self.client.set(self._alive_key(host), str(time.time()), ex=HEARTBEAT_TTL_S)

    def gone(self, host: str) -> None:
        """This host stopped taking work (its engine is down): stop choosing it now."""
        self.client.delete(self._alive_key(host))

    def alive(self, host: str) -> bool:
        return bool(self.client.exists(self._alive_key(host)))

    # A host's build pool (rgrid-builder.service) beats a key of its own: the run pool hands
    # an install to the host's build queue only while something consumes it. A host started
    # without its build pool (an upgrade that enabled only rgrid-worker.service, a builder
    # that keeps crashing) would otherwise leave every install waiting ``queued`` for ever.

    def _build_pool_key(self, host: str) -> str:
        return cache_keys.build_pool_alive_key(self.queue, host)

    def build_pool_beat(self, host: str) -> None:
        self.client.set(self._build_pool_key(host), str(time.time()), ex=HEARTBEAT_TTL_S)

    def build_pool_gone(self, host: str) -> None:
        self.client.delete(self._build_pool_key(host))

    def build_pool_alive(self, host: str) -> bool:
        return bool(self.client.exists(self._build_pool_key(host)))

    # Draining (`rgrid admin drain`): the host finishes what it runs and takes nothing new.
    # "requested" until the host's worker has stopped taking from the shared queue, then
    # "drained" (its engine watch says so), so the operator knows when it holds still.

    def drain(self, host: str) -> None:
        self.client.set(cache_keys.host_drained_key(self.queue, host), DRAIN_REQUESTED)
        self.gone(host)

    def undrain(self, host: str) -> bool:
        """Take work again; False when the host was not drained."""
        return bool(self.client.delete(cache_keys.host_drained_key(self.queue, host)))

    def drain_state(self, host: str) -> str | None:
        """None (taking work), DRAIN_REQUESTED or DRAINED."""
        value = self.client.get(cache_keys.host_drained_key(self.queue, host))
        return value.decode() if value is not None else None

    def acknowledge_drain(self, host: str) -> None:
        """The host's worker no longer consumes the shared queue (only while still drained:
        an undrain in between wins)."""
        self.client.set(cache_keys.host_drained_key(self.queue, host), DRAINED, xx=True)

    def has_environment(self, host: str, environment: str) -> None:
        self.client.sadd(self._env_key(environment), host)

    def lost_environment(self, host: str, environment: str) -> None:
        self.client.srem(self._env_key(environment), host)

    def hosts_with(self, environment: str) -> set[str]:
        return {h.decode() for h in self.client.smembers(self._env_key(environment))}

    def live_hosts(self) -> list[str]:
        prefix = self._alive_key("")
        return sorted(k.decode()[len(prefix) :] for k in self.client.scan_iter(prefix + "*"))

    def host_with_environment(
        self, environment: str | None, exclude: str | None = None
    ) -> str | None:
        """A live host that has ``environment`` installed (one at random, so one such host does
        not take every run), or None: no preference, any host will do. ``exclude``: a host
        that knows better from its own disk."""
        if not environment:
            return None
        live = [h for h in sorted(self.hosts_with(environment)) if h != exclude and self.alive(h)]
        return random.choice(live) if live else None


# --- pinning an execution to a host (its row's ``host``) -------------------------------------


def claim(session_factory: sessionmaker[Session], execution_id: str, host: str) -> bool:
    """Pin the execution to ``host`` unless another host holds it; True when ``host`` holds
    it now. A step that finds it held elsewhere is a stale copy (the execution was moved on
    when its host was lost) and must do nothing. One conditional UPDATE: two hosts can never
    both win."""
    return _repin_unless_held_elsewhere(session_factory, execution_id, host, host)


def release(session_factory: sessionmaker[Session], execution_id: str, host: str) -> bool:
    """Unpin the execution if ``host`` holds it (or nobody does), so any host may take it;
    True when it was ours to move."""
    return _repin_unless_held_elsewhere(session_factory, execution_id, host, None)


def _repin_unless_held_elsewhere(
    session_factory: sessionmaker[Session], execution_id: str, host: str, to: str | None
) -> bool:
    """Set the execution's host to ``to`` if ``host`` or nobody holds it; True if it did."""
    with session_scope(session_factory) as session:
        result = session.execute(
            update(Execution)
            .where(
                Execution.id == execution_id,
                or_(Execution.host.is_(None), Execution.host == host),
            )
            .values(host=to)
        )
        return result.rowcount == 1


def pinned_to_lost_hosts(
    session_factory: sessionmaker[Session], registry: HostRegistry
) -> list[tuple[str, str]]:
    """(execution, host) of executions waiting for a step on a host that stopped renewing its
    heartbeat (its worker died with its engine): their next step sits in a queue nobody
    consumes. Running ones are the lease sweep's (``rgrid.pipeline.lost.sweep_lost_workers``)."""
    with session_scope(session_factory) as session:
        rows = session.execute(
            select(Execution.id, Execution.host).where(
                Execution.host.is_not(None),
                Execution.status.in_((Status.QUEUED, Status.BUILDING)),
            )
        ).all()
    alive: dict[str, bool] = {}
    lost = []
    for execution_id, host in rows:
        if host not in alive:
            alive[host] = registry.alive(host)
        if not alive[host]:
            lost.append((execution_id, host))
    return lost


def busy_on(session_factory: sessionmaker[Session], host: str) -> list[tuple[str, str]]:
    """(execution, status) of the executions ``host`` holds that have not ended."""
    with session_scope(session_factory) as session:
        rows = session.execute(
            select(Execution.id, Execution.status).where(
                Execution.host == host,
                Execution.status.in_((Status.QUEUED, Status.BUILDING, Status.RUNNING)),
            )
        ).all()
    return [(execution_id, str(status)) for execution_id, status in rows]


def move(session_factory: sessionmaker[Session], execution_id: str, lost: str, to: str) -> bool:
    """Pin the execution to ``to`` if ``lost`` still holds it; True when moved. Straight to a
    live host, never through "nobody": a step of the lost host still draining its queue
    then finds it held elsewhere and drops its copy."""
    with session_scope(session_factory) as session:
        result = session.execute(
            update(Execution)
            .where(Execution.id == execution_id, Execution.host == lost)
            .values(host=to)
        )
        return result.rowcount == 1
