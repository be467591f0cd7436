"""Submitting and reading executions, for the API and the embedded default alike: the row
written from a checked submission (rgrid/service/submission.py), found by id or prefix,
listed, and its log and outputs read back."""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput, LostFromStore, NotFound, ServiceUnavailable
from rgrid.core.models import Execution, iso_utc
from rgrid.core.spec import RunSpec
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.service.submission import (
    CheckedSubmission,
    check_submission,
    store_script,
    tree_digest,
)
from rgrid.store.blobs import blobs_for
from rgrid.store.logbuffer import LogBuffer, LogChunk, iter_buffered, iter_log, stored_size
from rgrid.store.objectstore import ObjectStore, exists_many

#: A log page carries at most this many chunks and about this much text, so neither the API
#: nor the CLI ever holds a whole log in memory, however large.
LOG_PAGE_CHUNKS = 512
#: The most one ``GET /logs`` page carries, in stored bytes (plus at most one chunk).
LOG_PAGE_BYTES = 1024**2
#: The shortest execution id prefix accepted in place of the whole id.
MIN_ID_PREFIX = 4


def new_execution_id() -> str:
    return secrets.token_hex(8)


def create_execution(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    *,
    account_id: int,
    spec: RunSpec | None = None,
    stdin: bool = False,
    **fields: Any,
) -> Execution:
    """Check the submission, store the script (content-addressed) and write the execution
    row; the caller commits and only then enqueues the pipeline. ``spec``: the run; or its
    fields as keywords (scripts and tests), which make one. ``stdin``: the client will feed
    the script's stdin. Inputs must already be stored blobs of this account, or come
    ``spec.inline`` (``{sha256, data}``, base64: small files in the submission's body)."""
    spec = spec if spec is not None else RunSpec(**fields)
    checked = check_submission(session, settings, account_id, spec, store)
    digest = store_script(store, account_id, spec.script, settings.blob_presence_ttl_s)
    execution = _row(account_id, spec, checked, digest, stdin)
    session.add(execution)
    session.flush()
    return execution


def _row(
    account_id: int, spec: RunSpec, checked: CheckedSubmission, digest: str, stdin: bool
) -> Execution:
    """The new execution's row, queued, from the checked submission."""
    manifest = checked.inputs
    return Execution(
        id=new_execution_id(),
        account_id=account_id,
        status="queued",
        runtime=spec.runtime,
        script_name=spec.script_name,
        script_hash=digest,
        args=list(spec.args or []),
        requirements=checked.requirements,
        refresh_deps=bool(spec.refresh_deps),
        inputs=manifest,
        input_hash=cache_keys.input_hash(manifest) if manifest else None,
        sources=checked.sources or None,
        source_digest=tree_digest(spec.script_name, digest, checked.sources, checked.module),
        module=checked.module,
        dependency_source=checked.dependency_source,
        input_cache_hit=bool(manifest) and spec.files_uploaded == 0,
        files_uploaded=spec.files_uploaded,
        timeout_s=checked.timeout_s,
        memory_bytes=checked.memory_bytes,
        cpus=checked.cpus,
        stdin=bool(stdin),
        env_names=sorted(spec.env) if spec.env else None,
        script_cache_hit=False,
        dependency_cache_hit=None,
        bytes_uploaded=spec.bytes_uploaded,
        outputs=[],
    )


def get_execution(session: Session, account_id: int, execution_id: str) -> Execution:
    """By id, by a unique prefix of one (at least four characters, as git takes them), or
    ``last``: the account's newest. Another account's execution is simply not found: no
    account learns of another's work."""
    mine = select(Execution).where(Execution.account_id == account_id)
    if execution_id == "last":
        execution = session.scalars(mine.order_by(Execution.created_at.desc()).limit(1)).first()
        if execution is None:
            raise NotFound("no executions yet")
        return execution
    if re.fullmatch(f"[0-9a-f]{{{MIN_ID_PREFIX},15}}", execution_id):
        found = list(session.scalars(mine.where(Execution.id.startswith(execution_id)).limit(2)))
        if len(found) > 1:
            raise BadInput(f"{execution_id} is the start of more than one execution id")
        if found:
            return found[0]
        raise NotFound(f"no execution {execution_id}")
    execution = session.get(Execution, execution_id)
    if execution is None or execution.account_id != account_id:
        raise NotFound(f"no execution {execution_id}")
    return execution


def list_executions(
    session: Session, account_id: int, limit: int = 20, standalone: bool = False
) -> list[Execution]:
    """The account's newest executions; ``standalone``: only those of no batch (a listing
    shows each batch as one row of its own)."""
    query = select(Execution).where(Execution.account_id == account_id)
    if standalone:
        query = query.where(Execution.batch_id.is_(None))
    return list(
        session.scalars(query.order_by(Execution.created_at.desc()).limit(max(1, min(limit, 500))))
    )


def duration_s(execution: Execution) -> float | None:
    if execution.finished_at is None:
        return None
    created, finished = execution.created_at, execution.finished_at
    if (created.tzinfo is None) != (finished.tzinfo is None):  # SQLite drops the zone
        created, finished = created.replace(tzinfo=None), finished.replace(tzinfo=None)
    return round((finished - created).total_seconds(), 3)


def execution_to_dict(execution: Execution) -> dict:
    return {
        "execution_id": execution.id,
        "status": execution.status,
        "exit_code": execution.exit_code,
        "error": execution.error,
        # What the stored log lacks, if anything (None: it is complete).
        "log_incomplete": execution.log_incomplete,
        "runtime": execution.runtime,
        "script_name": execution.script_name,
        "script_hash": execution.script_hash,
        "dependency_hash": execution.dependency_hash,
        "environment": execution.environment,
        "runtime_image": execution.runtime_image,
        "host": execution.host,
        "sandbox_warm": execution.sandbox_warm,
        "resolved_dependencies": execution.resolved_dependencies,
        "refresh_deps": execution.refresh_deps,
        "input_hash": execution.input_hash,
        "inputs": execution.inputs,
        "source_digest": execution.source_digest,
        "sources": execution.sources or [],
        "module": execution.module,
        "dependency_source": execution.dependency_source,
        "files_uploaded": execution.files_uploaded,
        "args": execution.args,
        "timeout_s": execution.timeout_s,
        "memory_bytes": execution.memory_bytes,
        "cpus": execution.cpus,
        "stdin": execution.stdin,
        "env_names": execution.env_names or [],
        "batch_id": execution.batch_id,
        # A cache that does not apply (no dependencies, no inputs) is null, not a miss.
        "script_cache_hit": execution.script_cache_hit,
        "dependency_cache_hit": execution.dependency_cache_hit
        if cache_keys.has_dependencies(execution.dependency_hash)
        else None,
        "input_cache_hit": execution.input_cache_hit if execution.inputs else None,
        "bytes_uploaded": execution.bytes_uploaded,
        "deps_build_s": execution.deps_build_s,
        "run_s": execution.run_s,
        "duration_s": duration_s(execution),
        "outputs": execution.outputs,
        # Instant repeats (rgrid/pipeline/reuse.py): the run this one was answered from, and whether
        # the output cache was looked up (None: not asked) and hit.
        "reused_from": execution.reused_from,
        "output_cache_hit": execution.output_cache_hit,
        "created_at": iso_utc(execution.created_at),
        "started_at": iso_utc(execution.started_at),
        "finished_at": iso_utc(execution.finished_at),
    }


def _page(chunks: Iterator[LogChunk]) -> list[LogChunk]:
    """Chunks up to the page's limits, counted in stored (JSON) bytes, which is what the
    answer carries: a page of control bytes is six times its text."""
    page: list[LogChunk] = []
    size = 0
    for chunk in chunks:
        page.append(chunk)
        size += stored_size(*chunk)
        if len(page) >= LOG_PAGE_CHUNKS or size >= LOG_PAGE_BYTES:
            break
    return page


def replayed_log(source_id: str, stream) -> Iterator[LogChunk]:
    """A reused execution's log: one note saying so, then the script's own output from the
    original's log (its notes on caches and sandboxes were about a run that this was not)."""
    yield ("system", f"reused {source_id}: its output replayed; the script did not run\n")
    for chunk in iter_log(stream):
        if chunk[0] in ("stdout", "stderr"):
            yield chunk


def read_logs(execution: Execution, logs: LogBuffer, store: ObjectStore, offset: int = 0) -> dict:
    """One page of log chunks from ``offset`` on. ``complete`` is true once the final log is
    stored and this page reaches its end, so a follower knows it has seen everything."""
    finished = execution.status in TERMINAL_STATUSES
    more = False
    chunks: list[LogChunk]
    if finished:
        try:
            # A reused execution replays the log of the run it was answered from.
            source = execution.reused_from or execution.id
            stream = store.open_stream(cache_keys.log_object_key(source))
            with contextlib.closing(stream):
                stored = (
                    itertools.islice(replayed_log(execution.reused_from, stream), offset, None)
                    if execution.reused_from
                    else iter_log(stream, skip=offset)
                )
                chunks = _page(stored)
                more = next(stored, None) is not None
        except NotFound:
            if execution.log_stored:
                raise LostFromStore.log(execution.id) from None
            chunks = []  # it ended before any step ran (and wrote a log)
    else:
        chunks = _page(iter_buffered(logs, execution.id, offset))
    return {
        "status": execution.status,
        "complete": finished and not more,
        "offset": offset,
        "next_offset": offset + len(chunks),
        "chunks": [list(chunk) for chunk in chunks],
    }


def lost_objects(session: Session, execution: Execution, store: ObjectStore) -> dict:
    """What the object store no longer has of this execution although it was stored: whether
    its log is lost, and which outputs are (a lost pack: every output in it). One HEAD request
    per object, so only on request (`rgrid status`), never on a run's path."""
    log_lost = execution.log_stored and not store.exists(cache_keys.log_object_key(execution.id))
    outputs = execution.outputs or []
    blobs = blobs_for(session, execution.account_id, [o["sha256"] for o in outputs])
    present = exists_many(store, [blob.object_key for blob in blobs.values()])
    lost = [
        output["path"]
        for output in outputs
        if (blob := blobs.get(output["sha256"])) is None or not present[blob.object_key]
    ]
    return {"log_lost": bool(log_lost), "lost_outputs": lost}


def inline_small_outputs(listing: dict, store: ObjectStore, budget: int) -> None:
    """Give the smallest outputs of their own object their bytes (``data``, base64), up to
    ``budget`` bytes in all, read several at a time. One whose object is gone is left as it
    is, and so is one the store fails to read now: the client's own GET then says why."""
    small = sorted(
        (o for o in listing["outputs"] if "key" in o and "pack" not in o),
        key=lambda o: o["size"],
    )
    chosen, total = [], 0
    for output in small:
        if total + output["size"] > budget:
            break
        chosen.append(output)
        total += output["size"]
    if not chosen:
        return

    def read(output: dict) -> bytes | None:
        try:
            return store.get_bytes(output["key"])
        except (NotFound, ServiceUnavailable):
            return None

    with ThreadPoolExecutor(min(INLINE_READ_THREADS, len(chosen))) as pool:
        for output, data in zip(chosen, pool.map(read, chosen), strict=True):
            if data is not None:
                output["data"] = base64.b64encode(data).decode()


#: Outputs read at once for :func:`inline_small_outputs`.
INLINE_READ_THREADS = 8


def output_listing(session: Session, execution: Execution, store: ObjectStore) -> dict:
    """Where to fetch each output: ``outputs``, each with a presigned URL (or, for a local
    store, the key) of its own object, or, packed with other small outputs, the index of its
    pack in ``packs`` and its offset there; ``packs``, each pack once with its URL and key.
    A client fetches a pack's outputs with one (ranged) GET and splits it, instead of one GET
    per output; one URL is signed per pack, not per output."""
    listing = []
    packs: dict[str, int] = {}
    pack_list: list[dict] = []
    outputs = execution.outputs or []
    # One query for them all: a run may leave 100,000 files (issue 24).
    stored = blobs_for(session, execution.account_id, [output["sha256"] for output in outputs])
    for output in outputs:
        blob = stored.get(output["sha256"])
        if blob is None:
            raise NotFound(f"output {output['path']} is no longer stored")
        if blob.pack_offset is None:
            listing.append(
                {**output, "key": blob.object_key, "url": store.download_url(blob.object_key)}
            )
            continue
        if blob.object_key not in packs:
            packs[blob.object_key] = len(pack_list)
            pack_list.append({"key": blob.object_key, "url": store.download_url(blob.object_key)})
        listing.append({**output, "pack": packs[blob.object_key], "offset": blob.pack_offset})
    return {"outputs": listing, "packs": pack_list}
