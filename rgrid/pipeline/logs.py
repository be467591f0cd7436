"""An execution's log on its way: the capped sink a running script writes to, the notes that
say what a log lacks, and the stored copy made when the execution ends. Light on purpose (no
Docker): the service's cancel stores a log from the API's process."""

from __future__ import annotations

import itertools
import secrets
import threading
from typing import Protocol

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.models import Execution
from rgrid.core.units import human_limit
from rgrid.pipeline.rows import HasDatabase, patiently, update_execution
from rgrid.store.channels import ScriptChannels
from rgrid.store.logbuffer import LogBuffer, log_stream, stored_size
from rgrid.store.objectstore import ObjectStore


class Surroundings(HasDatabase, Protocol):
    """What the log helpers use: a PipelineContext has it, and so do the API's services."""

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> ObjectStore: ...
    @property
    def logs(self) -> LogBuffer: ...
    @property
    def channels(self) -> ScriptChannels: ...


#: The longest text one log chunk carries: a script's output is cut into chunks no larger,
#: so that a page of chunks stays small (``executions.LOG_PAGE_BYTES``).
MAX_CHUNK_CHARS = 8192


def system_note(ctx: Surroundings, execution_id: str, text: str) -> None:
    """A line from RGrid itself in the execution's log (cache decisions, limits hit)."""
    ctx.logs.append(execution_id, "system", text if text.endswith("\n") else text + "\n")


def capped_log(ctx: Surroundings, execution_id: str, written: int = 0):
    """The log sink for a running script: the buffer lives in Redis, which is also the broker,
    so a script printing in a loop must not be able to fill it. The cap counts each chunk's
    stored size (``logbuffer.stored_size``: control bytes take six), so it bounds what Redis,
    the object store and a reader hold. Past it, output is dropped with one note saying so."""
    limit = ctx.settings.max_log_bytes

    writer, sequence, lock = secrets.token_hex(8), itertools.count(), threading.Lock()

    def append(stream: str, piece: str) -> None:
        # Patiently: a Redis blip (a worker host's link down for seconds) used to fail the
        # append, the run step was retried, and the script ran a second time after the
        # first run's partial output (tests/integration/host/test_deploy_hosts.py saw
        # "donedone 3"). The script waits on its full pipe meanwhile; its deadline holds
        # inside the sandbox. Numbered, and in order (the lock), so a chunk sent again
        # after a lost reply is stored once.
        with lock:
            once = (writer, next(sequence))
            patiently(lambda: ctx.logs.append(execution_id, stream, piece, once=once))

    def sink(stream: str, text: str) -> None:
        nonlocal written
        for start in range(0, len(text), MAX_CHUNK_CHARS):
            if written >= limit:
                return
            piece = text[start : start + MAX_CHUNK_CHARS]
            size = stored_size(stream, piece)
            if written + size > limit:
                piece = _fitting(stream, piece, limit - written)
                if piece:
                    append(stream, piece)
                said = (
                    f"log truncated at {human_limit(limit)}: the rest of the script's"
                    " output was dropped"
                )
                system_note(ctx, execution_id, f"\n{said}")
                # On the row too: a run cut at the log limit is no clean success, and is
                # never recorded for reuse (its replay would lack the rest).
                mark_log_incomplete(ctx, execution_id, said)
                written = limit
                return
            written += size
            append(stream, piece)

    return sink


def _fitting(stream: str, text: str, room: int) -> str:
    """The longest start of ``text`` whose stored size fits in ``room`` bytes."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if stored_size(stream, text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def log_incomplete(ctx: Surroundings, execution_id: str, what: str) -> None:
    """Part of the log is gone for good: say so in the log and on the row (the summary)."""
    mark_log_incomplete(ctx, execution_id, what)
    system_note(ctx, execution_id, f"log incomplete: {what}")


def mark_log_incomplete(ctx: HasDatabase, execution_id: str, what: str) -> None:
    """What the stored log lacks, on the row (the summary says it; reuse never records it)."""

    def record(execution: Execution) -> None:
        execution.log_incomplete = (
            what if not execution.log_incomplete else f"{execution.log_incomplete}; {what}"
        )

    update_execution(ctx, execution_id, record)


def release(ctx: Surroundings, execution_id: str) -> None:
    """An execution is over: drop its live log (the stored one is complete) and whatever of
    its secrets and stdin still waits for it."""
    ctx.logs.clear(execution_id)
    ctx.channels.forget(execution_id)


def persist_logs(ctx: Surroundings, execution_id: str) -> None:
    """The log to the object store, streamed: from this host's journal of it when it keeps
    one (complete even if Redis lost chunks), else from the live buffer one batch of chunks
    at a time."""
    ctx.logs.sync(execution_id)
    if lost := ctx.logs.lost_chunks(execution_id):
        log_incomplete(
            ctx, execution_id, f"{lost} chunk(s) reached neither the log service nor this host"
        )
    with ctx.logs.journal(execution_id) as journal:
        stream = journal if journal is not None else log_stream(ctx.logs, execution_id)
        ctx.store.put_stream(cache_keys.log_object_key(execution_id), stream)
