"""Live log chunks of running executions: the buffer's interface, a log's stored form, and
reading a live log in batches.

While an execution runs, its output is appended to a buffer so that the CLI can follow it; the
store step then writes the whole log to the object store and clears the buffer. Readers take
logs from the buffer until the execution's status is final, and from the object store
afterwards. The buffers: rgrid/store/file_logs.py (the embedded default) and
rgrid/store/redis_logs.py (servers: Redis, and a worker's journal of record).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO, Protocol

#: (stream, text); the stream is "stdout" or "stderr" (the script's) or "system" (RGrid's own
#: messages: the build log, cache decisions, notes).
LogChunk = tuple[str, str]


#: Waits up to the given seconds for the next change to a log (a chunk, or its end).
WaitForChange = Callable[[float], None]


class LogBuffer(Protocol):
    def append(
        self, execution_id: str, stream: str, text: str, once: tuple[str, int] | None = None
    ) -> None:
        """``once``: (writer, sequence number) of a writer that may send the same chunk
        again (a retry after a lost reply): appended only if newer than that writer's last."""

    def read(
        self, execution_id: str, start: int = 0, limit: int | None = None
    ) -> list[LogChunk]: ...
    def clear(self, execution_id: str) -> None: ...
    def keep(self, execution_id: str) -> None:
        """Keep this execution's log on this host too, from now on (server workers)."""
        ...

    def sync(self, execution_id: str) -> bool:
        """Bring the live copy in step with the kept one; True when it is."""
        ...

    def journal(self, execution_id: str) -> AbstractContextManager[BinaryIO | None]:
        """The kept log in its stored form, or None when this host keeps none."""
        ...

    def lost_chunks(self, execution_id: str) -> int:
        """Chunks this process could keep nowhere (known lost)."""
        ...

    def changes(self, execution_id: str) -> AbstractContextManager[WaitForChange]:
        """Watch a log from now on: look at it inside the block, then wait for a change.
        A change between the look and the wait is not missed."""
        ...


def encode_chunk(chunk: LogChunk) -> bytes:
    """The stored form of one chunk: a JSON ``[stream, text]`` line. ASCII (control bytes and
    non-ASCII are escaped, ``\x01`` as six bytes), so its length in characters is its size in
    bytes, which is what the log cap counts (``stored_size``)."""
    return (json.dumps(list(chunk)) + "\n").encode()


def stored_size(stream: str, text: str) -> int:
    """Bytes the chunk takes once stored: in Redis, in the object store, in a ``GET /logs``
    page. The cap counts this, not the decoded text: 100 MiB of ``\x01`` under a cap on the
    text grew Redis by 832 MiB."""
    return len(json.dumps([stream, text])) + 1


def encode_log(chunks: list[LogChunk]) -> bytes:
    """The stored form of a finished log: one JSON ``[stream, text]`` per line."""
    return b"".join(encode_chunk(chunk) for chunk in chunks)


#: Chunks read from a live buffer at a time while persisting or paging a log.
READ_BATCH = 64


def iter_buffered(logs: LogBuffer, execution_id: str, start: int = 0) -> Iterator[LogChunk]:
    """A live log's chunks, ``READ_BATCH`` at a time: never the whole log at once."""
    while batch := logs.read(execution_id, start, READ_BATCH):
        yield from batch
        start += len(batch)
        if len(batch) < READ_BATCH:
            return


class OwnRecord:
    """For a buffer that is its own record (the embedded default's files, a bare Redis list):
    nothing kept beside it, so always in step, with no journal and no chunk known lost. Only
    ``JournaledLogBuffer`` keeps a log on the host beside its live copy."""

    def keep(self, execution_id: str) -> None:
        """Nothing to keep beside it: this buffer is its own record."""

    def sync(self, execution_id: str) -> bool:
        return True

    @contextmanager
    def journal(self, execution_id: str) -> Iterator[BinaryIO | None]:
        yield None

    def lost_chunks(self, execution_id: str) -> int:
        return 0


class LogReader(io.RawIOBase):
    """A live log as a binary stream of its stored form, for ``ObjectStore.put_stream``:
    persisting a log holds one batch of chunks, not the log."""

    def __init__(self, logs: LogBuffer, execution_id: str):
        self._chunks = iter_buffered(logs, execution_id)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = encode_chunk(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def log_stream(logs: LogBuffer, execution_id: str) -> BinaryIO:
    return io.BufferedReader(LogReader(logs, execution_id), 1024 * 1024)  # type: ignore[return-value]


def decode_log(data: bytes) -> list[LogChunk]:
    return [tuple(json.loads(line)) for line in data.decode().splitlines() if line]  # type: ignore[misc]


def iter_log(stream: BinaryIO, skip: int = 0) -> Iterator[LogChunk]:
    """The chunks of a stored log after the first ``skip``, read from a stream 1 MiB at a
    time: a reader of one page of a large log never holds the whole of it, and the chunks
    before the page are counted (a stored line never holds a raw newline), not parsed."""
    rest = b""
    while block := stream.read(1024 * 1024):
        block = rest + block
        if skip:
            ends = block.count(b"\n")
            if ends <= skip:
                skip -= ends
                rest = block[block.rfind(b"\n") + 1 :]
                continue
            position = -1
            for _ in range(skip):
                position = block.find(b"\n", position + 1)
            block, skip = block[position + 1 :], 0
        *lines, rest = block.split(b"\n")
        for line in lines:
            if line:
                yield tuple(json.loads(line))  # type: ignore[misc]
    if rest.strip() and not skip:
        yield tuple(json.loads(rest))  # type: ignore[misc]
