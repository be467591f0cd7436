"""The servers' log buffers: a Redis list per execution, shared by the workers that write and
the API that reads, and a worker's journal file per execution on its host, the log of record
that Redis mirrors for following live."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from rgrid.core import cache_keys
from rgrid.core.errors import ServiceUnavailable
from rgrid.store.logbuffer import LogChunk, OwnRecord, WaitForChange, encode_chunk
from rgrid.store.redis_errors import redis_unavailable

if TYPE_CHECKING:
    import redis  # imported by the server context only: ~0.1 s the embedded default saves

log = logging.getLogger(__name__)


class RedisLogBuffer(OwnRecord):
    """A Redis list per execution, shared by the workers that write and the API that reads."""

    TTL_S = 7 * 24 * 3600

    def __init__(self, client: redis.Redis):
        self.client = client

    #: RPUSH unless the writer's sequence number is not newer than the last one it appended:
    #: a reply lost with a host's link (redis-py then sends the command again, and so do our
    #: own retries) must not store the chunk twice ("donedone 8" was seen).
    _APPEND_ONCE = """
    local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
    if tonumber(ARGV[2]) <= last then return 0 end
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    redis.call('EXPIRE', KEYS[2], ARGV[4])
    redis.call('RPUSH', KEYS[1], ARGV[3])
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    redis.call('PUBLISH', KEYS[3], '')
    return 1
    """

    @redis_unavailable
    def append(
        self, execution_id: str, stream: str, text: str, once: tuple[str, int] | None = None
    ) -> None:
        key = cache_keys.log_buffer_key(execution_id)
        if once is not None:
            keys = (
                key,
                cache_keys.log_writers_key(execution_id),
                cache_keys.log_changed_channel(execution_id),
            )
            chunk = json.dumps([stream, text])
            self.client.eval(self._APPEND_ONCE, 3, *keys, once[0], once[1], chunk, self.TTL_S)
            return
        pipe = self.client.pipeline()
        pipe.rpush(key, json.dumps([stream, text]))
        pipe.expire(key, self.TTL_S)
        pipe.publish(cache_keys.log_changed_channel(execution_id), b"")
        pipe.execute()

    @redis_unavailable
    def read(self, execution_id: str, start: int = 0, limit: int | None = None) -> list[LogChunk]:
        end = -1 if limit is None else start + limit - 1
        raw = self.client.lrange(cache_keys.log_buffer_key(execution_id), start, end)
        return [tuple(json.loads(item)) for item in raw]  # type: ignore[misc]

    @redis_unavailable
    def clear(self, execution_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.delete(
            cache_keys.log_buffer_key(execution_id), cache_keys.log_writers_key(execution_id)
        )
        pipe.publish(cache_keys.log_changed_channel(execution_id), b"")
        pipe.execute()

    @contextmanager
    def changes(self, execution_id: str) -> Iterator[WaitForChange]:
        """Subscribed to the log's channel before the caller looks, so the wait wakes the
        moment a worker appends or ends the log, with no polling in between."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            redis_unavailable(pubsub.subscribe)(cache_keys.log_changed_channel(execution_id))

            @redis_unavailable
            def wait(timeout_s: float) -> None:
                deadline = time.monotonic() + timeout_s
                while (left := deadline - time.monotonic()) > 0:
                    if pubsub.get_message(timeout=left) is not None:
                        return

            yield wait
        finally:
            pubsub.close()


#: Append one chunk only if the list holds exactly the chunks the writer knows of (ARGV[1]);
#: else change nothing and answer -(its length + 1). So a list that lost chunks (Redis
#: restarted, a push that failed) or gained some (a writer elsewhere) is never appended to
#: out of step with the journal.
_PUSH_IF_IN_STEP = """
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[1]) then return -n - 1 end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], '')
return n + 1
"""


class JournaledLogBuffer:
    """A server worker's log: Redis for following a run live, and a journal file per
    execution on this host as the log of record.

    The build and run steps open the journal (``keep``), which takes in what other steps
    (other hosts, the API) wrote to Redis before; from then on every chunk written here goes
    to the journal, and to Redis only in step with it (``_PUSH_IF_IN_STEP``). When Redis
    restarts empty or misses pushes while it is away, the next append (or ``sync``) writes
    the journal's chunks back into it in order, so a follower's offset means the same chunk
    again and it reads exactly the lines it missed; the stored log is persisted from the
    journal. A Redis outage never fails the run: it only delays the live view. Chunks for an
    execution without a journal here go to Redis alone, as before. Writers on this host
    (Celery's pool processes) take turns under a lock on the journal file."""

    BATCH = 256

    def __init__(self, live: RedisLogBuffer, folder: Path):
        self.live = live
        self.folder = folder
        #: Per execution: (journal size, chunks in it) when this process last counted.
        self._counted: dict[str, tuple[int, int]] = {}
        #: Chunks neither journal nor Redis took (a full host disk while Redis was away).
        self.lost: dict[str, int] = defaultdict(int)
        self._push = None

    @property
    def client(self) -> redis.Redis:
        return self.live.client

    def path(self, execution_id: str) -> Path:
        return self.folder / f"{execution_id}.jsonl"

    def keeps(self, execution_id: str) -> bool:
        return self.path(execution_id).exists()

    def keep(self, execution_id: str) -> None:
        """Start this execution's journal here (idempotent) with what Redis holds so far."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path(execution_id).touch()
        self.sync(execution_id)

    @contextmanager
    def _journal(self, execution_id: str) -> Iterator[tuple[BinaryIO, int]]:
        import fcntl

        with open(self.path(execution_id), "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            size = os.fstat(fh.fileno()).st_size
            counted_size, count = self._counted.get(execution_id, (0, 0))
            if counted_size > size:
                counted_size, count = 0, 0
            if counted_size < size:
                fh.seek(counted_size)
                count += fh.read(size - counted_size).count(b"\n")
            self._counted[execution_id] = (size, count)
            yield fh, count

    def _write(self, execution_id: str, fh: BinaryIO, lines: list[bytes]) -> None:
        fh.write(b"".join(lines))
        fh.flush()
        size, count = self._counted[execution_id]
        self._counted[execution_id] = (size + sum(map(len, lines)), count + len(lines))

    def _push_in_step(self, execution_id: str, count: int, line: bytes) -> int:
        if self._push is None:
            self._push = self.live.client.register_script(_PUSH_IF_IN_STEP)
        return int(
            self._push(
                keys=[cache_keys.log_buffer_key(execution_id)],
                args=[
                    count,
                    line.rstrip(b"\n"),
                    self.live.TTL_S,
                    cache_keys.log_changed_channel(execution_id),
                ],
            )
        )

    def _journal_lines(self, fh: BinaryIO, start: int) -> Iterator[bytes]:
        fh.seek(0)
        for number, line in enumerate(fh):
            if number >= start:
                yield line.rstrip(b"\n")

    def _catch_up(self, execution_id: str, fh: BinaryIO, count: int, listed: int) -> int:
        """Bring journal and Redis in step; returns the journal's chunk count after."""
        client, key = self.live.client, cache_keys.log_buffer_key(execution_id)
        if listed > count:
            # Written elsewhere (an earlier step's host, the API): into the journal.
            raw = client.lrange(key, count, listed - 1)
            self._write(execution_id, fh, [item + b"\n" for item in raw])
            return count + len(raw)
        in_step = listed > 0 and _same(
            client.lindex(key, listed - 1), next(self._journal_lines(fh, listed - 1), None)
        )
        start = listed if in_step else 0
        pipe = client.pipeline(transaction=False)
        if not in_step:
            pipe.delete(key)
        batch: list[bytes] = []
        for line in self._journal_lines(fh, start):
            batch.append(line)
            if len(batch) >= self.BATCH:
                pipe.rpush(key, *batch)
                batch = []
        if batch:
            pipe.rpush(key, *batch)
        pipe.expire(key, self.live.TTL_S)
        pipe.publish(cache_keys.log_changed_channel(execution_id), b"")
        pipe.execute()
        fh.seek(0, os.SEEK_END)
        return count

    def append(
        self, execution_id: str, stream: str, text: str, once: tuple[str, int] | None = None
    ) -> None:
        """A journaled chunk needs no ``once``: it is pushed only while Redis holds exactly
        the journal's chunks, so a push whose reply was lost is seen as done at the next."""
        if not self.keeps(execution_id):
            self.live.append(execution_id, stream, text, once=once)
            return
        line = encode_chunk((stream, text))
        from redis.exceptions import RedisError

        with self._journal(execution_id) as (fh, count):
            pushed = False
            try:
                for _ in range(3):
                    answer = self._push_in_step(execution_id, count, line)
                    if answer > 0:
                        pushed = True
                        break
                    count = self._catch_up(execution_id, fh, count, -answer - 1)
            except RedisError:
                log.warning("log of %s: Redis unavailable, kept on this host", execution_id)
            try:
                self._write(execution_id, fh, [line])
            except OSError:
                # This host's disk is full: the run goes on; a chunk Redis has is taken
                # back into the journal at the next sync, one neither has is counted.
                log.warning("log of %s: could not keep a chunk on this host", execution_id)
                if not pushed:
                    self.lost[execution_id] += 1

    def sync(self, execution_id: str) -> bool:
        """Journal and Redis in step now, if Redis answers; True when they are."""
        if not self.keeps(execution_id):
            return False
        from redis.exceptions import RedisError

        with self._journal(execution_id) as (fh, count):
            try:
                listed = self.live.client.llen(cache_keys.log_buffer_key(execution_id))
                if listed != count:
                    self._catch_up(execution_id, fh, count, listed)
            except RedisError:
                return False
        return True

    def read(self, execution_id: str, start: int = 0, limit: int | None = None) -> list[LogChunk]:
        if not self.keeps(execution_id):
            return self.live.read(execution_id, start, limit)
        chunks: list[LogChunk] = []
        with open(self.path(execution_id), "rb") as fh:
            for number, line in enumerate(fh):
                if number < start or not line.endswith(b"\n"):
                    continue
                chunks.append(tuple(json.loads(line)))  # type: ignore[arg-type]
                if limit is not None and len(chunks) >= limit:
                    break
        return chunks

    def clear(self, execution_id: str) -> None:
        self.path(execution_id).unlink(missing_ok=True)
        self._counted.pop(execution_id, None)
        self.lost.pop(execution_id, None)
        try:
            self.live.clear(execution_id)
        except ServiceUnavailable:
            pass  # its TTL ends it; the stored log is complete

    def lost_chunks(self, execution_id: str) -> int:
        return self.lost.get(execution_id, 0)

    @contextmanager
    def journal(self, execution_id: str) -> Iterator[BinaryIO | None]:
        try:
            fh = open(self.path(execution_id), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            yield None
            return
        with fh:
            yield fh

    def changes(self, execution_id: str) -> AbstractContextManager[WaitForChange]:
        return self.live.changes(execution_id)


def _same(listed: bytes | None, journaled: bytes | None) -> bool:
    return listed is not None and journaled is not None and listed == journaled
