"""Worker hosts of one deployment: which are alive, which hold which environment, and the
queue of each.

A worker host is one Docker engine with the Celery worker(s) bound to it and its own local
caches (environments, warm pool, blob and uv caches). Each host's worker consumes the shared
queue and a queue of its own (:func:`host_queue`): the first step of an execution that touches
Docker pins the execution to its host and sends the remaining steps to that host's queue, so
an environment is installed where the script then runs. Before that, the dispatcher prefers
a live host that already has the execution's environment (:meth:`HostRegistry.warm_host`).

All of it lives in Redis under the deployment's queue name (test sessions have their own),
with a heartbeat key per host that expires when the host stops renewing it: a host whose
worker died, or whose Docker engine stopped answering, is no longer chosen.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

#: A host renews its heartbeat this often, and is taken for gone once it is this old.
HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_TTL_S = 10


def host_queue(queue: str, host: str) -> str:
    """The Celery queue only ``host``'s workers consume."""
    return f"{queue}.host.{host}"


class HostRegistry:
    """The deployment's view of its hosts, in Redis."""

    def __init__(self, client: redis.Redis, queue: str):
        self.client = client
        self.queue = queue

    def _alive_key(self, host: str) -> str:
        return f"rgrid:{self.queue}:host-alive:{host}"

    def _env_key(self, environment: str) -> str:
        return f"rgrid:{self.queue}:env-hosts:{environment}"

    def beat(self, host: str) -> None:
        """This host's engine answers: keep it choosable for another TTL."""
        self.client.set(self._alive_key(host), str(time.time()), ex=HEARTBEAT_TTL_S)

    def gone(self, host: str) -> None:
        """This host stopped taking work (its engine is down): stop choosing it now."""
        self.client.delete(self._alive_key(host))

    def alive(self, host: str) -> bool:
        return bool(self.client.exists(self._alive_key(host)))

    def has_environment(self, host: str, environment: str) -> None:
        self.client.sadd(self._env_key(environment), host)

    def lost_environment(self, host: str, environment: str) -> None:
        self.client.srem(self._env_key(environment), host)

    def hosts_with(self, environment: str) -> set[str]:
        return {h.decode() for h in self.client.smembers(self._env_key(environment))}

    def live_hosts(self) -> list[str]:
        prefix = self._alive_key("")
        return sorted(k.decode()[len(prefix) :] for k in self.client.scan_iter(prefix + "*"))

    def warm_host(self, environment: str | None) -> str | None:
        """A live host that has ``environment`` installed (one at random, so one warm host does
        not take every run), or None: no preference, any host will do."""
        if not environment:
            return None
        live = [h for h in sorted(self.hosts_with(environment)) if self.alive(h)]
        return random.choice(live) if live else None
