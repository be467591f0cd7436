"""Live log chunks of running executions.

While an execution runs, its output is appended here so that the CLI can follow it; the store
step then writes the whole log to the object store and clears the buffer. Readers take logs
from here until the execution's status is final, and from the object store afterwards.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Protocol

from rgrid.errors import ServiceUnavailable

if TYPE_CHECKING:
    import redis  # imported by the server context only: ~0.1 s the embedded default saves

#: (stream, text); the stream is "stdout" or "stderr" (the script's) or "system" (RGrid's own
#: messages: the build log, cache decisions, notes).
LogChunk = tuple[str, str]


class LogBuffer(Protocol):
    def append(self, execution_id: str, stream: str, text: str) -> None: ...
    def read(self, execution_id: str, start: int = 0) -> list[LogChunk]: ...
    def clear(self, execution_id: str) -> None: ...


class MemoryLogBuffer:
    """For the embedded default, where the pipeline runs in the CLI's own process."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[LogChunk]] = defaultdict(list)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cleared: set[str] = set()

    def append(self, execution_id: str, stream: str, text: str) -> None:
        with self._lock:
            self._chunks[execution_id].append((stream, text))
            self._changed.notify_all()

    def wait(self, execution_id: str, start: int, timeout_s: float) -> None:
        """Until the log has more than ``start`` chunks or is cleared (the run is over): the
        CLI's follower wakes the moment the pipeline thread writes, instead of polling."""
        with self._lock:
            self._changed.wait_for(
                lambda: execution_id not in self._chunks or len(self._chunks[execution_id]) > start,
                timeout_s,
            )

    def read(self, execution_id: str, start: int = 0) -> list[LogChunk]:
        with self._lock:
            return list(self._chunks.get(execution_id, [])[start:])

    def clear(self, execution_id: str) -> None:
        with self._lock:
            self._chunks.pop(execution_id, None)
            self._cleared.add(execution_id)
            self._changed.notify_all()


def _redis_unavailable(method):
    """Redis down is a service outage like any other: ServiceUnavailable, which the worker
    retries and the API answers with 503."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            return method(*args, **kwargs)
        except (ConnectionError, TimeoutError) as exc:
            raise ServiceUnavailable("the queue and log service (Redis) is unavailable") from exc

    return wrapper


class RedisLogBuffer:
    """A Redis list per execution, shared by the workers that write and the API that reads."""

    TTL_S = 7 * 24 * 3600

    def __init__(self, client: redis.Redis):
        self.client = client

    @staticmethod
    def _key(execution_id: str) -> str:
        return f"rgrid:log:{execution_id}"

    @_redis_unavailable
    def append(self, execution_id: str, stream: str, text: str) -> None:
        key = self._key(execution_id)
        pipe = self.client.pipeline()
        pipe.rpush(key, json.dumps([stream, text]))
        pipe.expire(key, self.TTL_S)
        pipe.execute()

    @_redis_unavailable
    def read(self, execution_id: str, start: int = 0) -> list[LogChunk]:
        raw = self.client.lrange(self._key(execution_id), start, -1)
        return [tuple(json.loads(item)) for item in raw]  # type: ignore[misc]

    @_redis_unavailable
    def clear(self, execution_id: str) -> None:
        self.client.delete(self._key(execution_id))


def encode_log(chunks: list[LogChunk]) -> bytes:
    """The stored form of a finished log: one JSON ``[stream, text]`` per line."""
    return "".join(json.dumps(list(chunk)) + "\n" for chunk in chunks).encode()


def decode_log(data: bytes) -> list[LogChunk]:
    return [tuple(json.loads(line)) for line in data.decode().splitlines() if line]  # type: ignore[misc]
