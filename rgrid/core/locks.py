"""Single-flight locks: one build per cache key at a time.

Across hosts the lock lives in Redis (with an expiry, so a dead builder cannot block others for
ever); for the embedded default, where one machine is the whole grid, a file lock does.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rgrid.core.errors import RGridError

if TYPE_CHECKING:
    import redis  # imported by the server context only: ~0.1 s the embedded default saves


class LockFactory(Protocol):
    def hold(self, name: str, timeout_s: int): ...


class RedisLocks:
    def __init__(self, client: redis.Redis, lease_s: int = 1800):
        self.client = client
        self.lease_s = lease_s

    @contextmanager
    def hold(self, name: str, timeout_s: int) -> Iterator[None]:
        # The lease (twice the waiters' timeout) outlasts any wait, so a waiter gives up rather
        # than build alongside a live builder; it lapses if the holder dies, so a killed
        # builder blocks the others for at most one lease.
        from redis.exceptions import LockError

        lock = self.client.lock(
            name, timeout=self.lease_s, blocking_timeout=timeout_s, thread_local=False
        )
        if not lock.acquire():
            raise RGridError(f"gave up waiting {timeout_s}s for another build of the same image")
        try:
            yield
        finally:
            try:
                lock.release()
            except LockError:
                pass  # The lease lapsed; someone else may hold it now, which is fine.


class FileLocks:
    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def hold(self, name: str, timeout_s: int) -> Iterator[None]:
        path = self.directory / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".lock")
        deadline = time.monotonic() + timeout_s
        with open(path, "w") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RGridError(
                            f"gave up waiting {timeout_s}s for another build of the same image"
                        ) from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
