"""The embedded default's log buffer: in memory for the process that runs the execution, and a
file per execution under the data folder for a follower in another terminal."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rgrid.store.logbuffer import LogChunk, OwnRecord, WaitForChange


class FileLogBuffer(OwnRecord):
    """For the embedded default, where the pipeline runs in the CLI's own process.

    The process that runs an execution keeps its log in memory, so its own follower wakes the
    moment the pipeline writes; each chunk is also appended to a file under the data folder,
    so ``rgrid logs ID`` in another terminal follows the same run live."""

    POLL_S = 0.1

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._chunks: dict[str, list[LogChunk]] = defaultdict(list)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: Where another process's log file was last read up to: (chunks, byte offset).
        self._read_to: dict[str, tuple[int, int]] = {}
        #: Bumped by every append and clear of this process: a follower that started before
        #: this process's run wrote anything still wakes when it does (or when it is over).
        self._generation = 0

    def _path(self, execution_id: str) -> Path:
        return self.folder / f"{execution_id}.jsonl"

    def append(
        self, execution_id: str, stream: str, text: str, once: tuple[str, int] | None = None
    ) -> None:
        line = json.dumps([stream, text]) + "\n"
        with self._lock:
            if execution_id not in self._chunks:
                self.folder.mkdir(parents=True, exist_ok=True)
            self._chunks[execution_id].append((stream, text))
            with open(self._path(execution_id), "a", encoding="utf-8") as fh:
                fh.write(line)
            self._generation += 1
            self._changed.notify_all()

    def wait(self, execution_id: str, start: int, timeout_s: float) -> None:
        """Until the log has more than ``start`` chunks or is cleared (the run is over). A run
        of this process wakes its follower at once; another process's run is polled."""
        with self._lock:
            if execution_id in self._chunks:
                self._changed.wait_for(
                    lambda: (
                        execution_id not in self._chunks or len(self._chunks[execution_id]) > start
                    ),
                    timeout_s,
                )
                return
            generation = self._generation
        deadline = time.monotonic() + timeout_s
        path = self._path(execution_id)
        size = path.stat().st_size if path.exists() else -1
        while time.monotonic() < deadline:
            with self._lock:
                self._changed.wait(self.POLL_S)
                if self._generation != generation:
                    return
            now = path.stat().st_size if path.exists() else -1
            if now != size:
                return

    def read(self, execution_id: str, start: int = 0, limit: int | None = None) -> list[LogChunk]:
        end = None if limit is None else start + limit
        with self._lock:
            if execution_id in self._chunks:
                return list(self._chunks[execution_id][start:end])
        return self._read_file(execution_id, start, limit)

    def _read_file(self, execution_id: str, start: int, limit: int | None) -> list[LogChunk]:
        count, position = self._read_to.get(execution_id, (0, 0))
        if start < count:
            count, position = 0, 0
        chunks: list[LogChunk] = []
        try:
            with open(self._path(execution_id), "rb") as fh:
                fh.seek(position)
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # the writer is half way through this one
                    position += len(line)
                    count += 1
                    if count > start:
                        chunks.append(tuple(json.loads(line)))  # type: ignore[arg-type]
                        if limit is not None and len(chunks) >= limit:
                            break
        except FileNotFoundError:
            return []
        self._read_to[execution_id] = (count, position)
        return chunks

    def clear(self, execution_id: str) -> None:
        with self._lock:
            self._chunks.pop(execution_id, None)
            self._read_to.pop(execution_id, None)
            self._path(execution_id).unlink(missing_ok=True)
            self._generation += 1
            self._changed.notify_all()

    @contextmanager
    def changes(self, execution_id: str) -> Iterator[WaitForChange]:
        """Wakes on this process's changes at once; another process's are seen within
        ``POLL_S``, when the caller looks again."""
        with self._lock:
            generation = self._generation

        def wait(timeout_s: float) -> None:
            nonlocal generation
            with self._lock:
                self._changed.wait_for(
                    lambda: self._generation != generation, min(timeout_s, self.POLL_S)
                )
                generation = self._generation

        yield wait
