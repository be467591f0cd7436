"""Batches: one script over many inputs, for the API (and anything else with a database).

A batch is created with what its executions share (the script, options, shared inputs),
filled with one execution per input in pages (a 10,000-input batch never sits whole in the
memory of the CLI or the API), then started. From then on it is dispatched: at most
``parallel`` of its executions are handed to the queue at a time, and each one that ends
hands on the next ones (``after_execution``, called by the worker that ended it). Who hands
on is decided under a row lock on the batch, so no execution is queued twice or forgotten;
beat's ``dispatch_stalled`` catches a batch whose dispatcher died between the two.

How a batch is doing is always counted from its executions' rows, never kept in a counter
that could drift from them.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from rgrid.core import cache_keys, lifecycle
from rgrid.core.config import Settings
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput, NotFound
from rgrid.core.models import Batch, Execution, utcnow
from rgrid.core.spec import SUBMISSION_ONLY, RunSpec
from rgrid.core.statuses import TERMINAL_STATUSES, Status
from rgrid.service.submission import (
    CheckedSubmission,
    check_submission,
    store_script,
    tree_digest,
)
from rgrid.store.blobs import check_uploaded
from rgrid.store.inputs import check_manifest
from rgrid.store.objectstore import ObjectStore

#: The most inputs one request may add to a batch: a page, not the whole batch.
PAGE_SIZE = 1000
#: A batch id is this many hex digits; its executions' ids add ``INDEX_DIGITS`` more, so the
#: batch id is a prefix of each (16 in all, as any execution id).
BATCH_ID_DIGITS = 10
INDEX_DIGITS = 6
#: The statuses `rgrid batch retry` runs again: every way of ending but success.
RETRYABLE = frozenset(TERMINAL_STATUSES - {Status.SUCCEEDED})

Enqueue = Callable[[str], None]


def new_batch_id() -> str:
    return secrets.token_hex(BATCH_ID_DIGITS // 2)


def execution_id_for(batch_id: str, index: int) -> str:
    return f"{batch_id}{index:0{INDEX_DIGITS}x}"


def create_batch(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    *,
    account_id: int,
    spec: RunSpec | None = None,
    parallel: int | None = None,
    size: int | None = None,
    **fields: Any,
) -> Batch:
    """Check what every execution of the batch will share (``spec``: the run; or its fields
    as keywords, which make one), once, and store the script; the batch then waits for its
    inputs (``add_inputs``) and ``start``."""
    spec = spec if spec is not None else RunSpec(**fields)
    if any(getattr(spec, name) for name in SUBMISSION_ONLY):
        raise BadInput("a batch takes no env, inline files or upload counts")
    checked = check_submission(session, settings, account_id, spec)
    if size is not None and size > settings.max_batch_executions:
        raise BadInput(
            f"{size} inputs: over the limit of {settings.max_batch_executions} per batch"
        )
    if parallel is not None and (isinstance(parallel, bool) or parallel < 1):
        raise BadInput("parallel must be at least 1")
    digest = store_script(store, account_id, spec.script)
    batch = Batch(
        id=new_batch_id(),
        account_id=account_id,
        script_name=spec.script_name,
        script_hash=digest,
        runtime=spec.runtime,
        parallel=parallel,
        next_index=0,
        template=_template(spec, checked, digest),
    )
    session.add(batch)
    session.flush()
    return batch


def _template(spec: RunSpec, checked: CheckedSubmission, digest: str) -> dict:
    """What each execution of the batch is made of, besides its own input."""
    return {
        "timeout_s": checked.timeout_s,
        "args": list(spec.args or []),
        "requirements": checked.requirements,
        "refresh_deps": bool(spec.refresh_deps),
        "inputs": checked.inputs,
        "memory_bytes": checked.memory_bytes,
        "cpus": checked.cpus,
        # The source tree is shipped once for the whole batch: every execution names it.
        "sources": checked.sources or None,
        "source_digest": tree_digest(spec.script_name, digest, checked.sources, checked.module),
        "module": checked.module,
        "dependency_source": checked.dependency_source,
        # Instant repeats (rgrid/pipeline/reuse.py): each input added is looked up in the
        # output cache (None: the server's RGRID_REUSE_DEFAULT when it is added);
        # ``refresh``: every one runs, and its entry replaces the old one.
        "reuse": None if spec.reuse is None else bool(spec.reuse),
        "refresh": bool(spec.refresh),
    }


def _locked(session: Session, account_id: int, batch_id: str) -> Batch:
    """The batch, its row locked until the transaction ends: adding, starting, dispatching,
    cancelling and retrying one batch happen one at a time."""
    batch = session.scalars(
        select(Batch).where(Batch.id == batch_id, Batch.account_id == account_id).with_for_update()
    ).one_or_none()
    if batch is None:
        raise NotFound(f"no batch {batch_id}")
    return batch


def add_inputs(
    session: Session,
    settings: Settings,
    account_id: int,
    batch_id: str,
    items: list[dict],
    *,
    store: ObjectStore | None = None,
    runtime_image: Callable[[str], str | None] | None = None,
) -> int:
    """One execution per input (``{path, sha256, size}``, already uploaded), in one
    transaction; the input is placed at its path in /work and its path is the script's first
    argument. Returns how many the batch now holds (``add_page`` says how many were reused
    too)."""
    return add_page(
        session, settings, account_id, batch_id, items, store=store, runtime_image=runtime_image
    )["total"]


def add_page(
    session: Session,
    settings: Settings,
    account_id: int,
    batch_id: str,
    items: list[dict],
    *,
    store: ObjectStore | None = None,
    runtime_image: Callable[[str], str | None] | None = None,
) -> dict:
    """``add_inputs``, with the output-cache lookup of the page when the batch reuses (and a
    ``store`` is given to check the hits' objects in): the executions whose action key has
    a live entry are answered at once, in the same INSERT, and are never dispatched;
    ``runtime_image(runtime)``: the image the runs will get. Returns ``{total, reused}``."""
    batch = _open_batch(session, settings, account_id, batch_id, items)
    template = batch.template
    clean = _checked_page(session, settings, account_id, batch, items)
    rows = [
        _execution_row(batch, account_id, batch.next_index + offset, item)
        for offset, item in enumerate(clean)
    ]
    from rgrid.pipeline import reuse_batch

    answered = reuse_batch.for_batch(
        session,
        store,
        settings,
        account_id,
        rows,
        reuse=template.get("reuse"),
        refresh=bool(template.get("refresh")),
        runtime_image=runtime_image,
    )
    session.execute(insert(Execution), rows)
    batch.next_index += len(rows)
    return {"total": batch.next_index, "reused": len(answered)}


def _open_batch(
    session: Session, settings: Settings, account_id: int, batch_id: str, items: list[dict]
) -> Batch:
    """The batch, locked, if it may take this page: not started, and not over its limit."""
    if not items:
        raise BadInput("no inputs to add")
    if len(items) > PAGE_SIZE:
        raise BadInput(f"at most {PAGE_SIZE} inputs per request: add them in pages")
    batch = _locked(session, account_id, batch_id)
    if batch.started_at is not None:
        raise BadInput(f"batch {batch.id} has started: no inputs can be added")
    if batch.next_index + len(items) > settings.max_batch_executions:
        raise BadInput(
            f"a batch may hold at most {settings.max_batch_executions} executions"
            f" (this one would hold {batch.next_index + len(items)})"
        )
    return batch


def _checked_page(
    session: Session, settings: Settings, account_id: int, batch: Batch, items: list[dict]
) -> list[dict]:
    """The page's inputs checked as any manifest, each also beside the shared inputs, none
    where the script, a shared input or a shipped module goes, and all uploaded."""
    template = batch.template
    shared = template["inputs"]
    sources = template.get("sources") or []
    taken = {item["path"] for item in [*shared, *sources]} | {batch.script_name}
    clean = check_manifest(items, settings)
    for item in clean:
        if item["path"] in taken:
            raise BadInput(f"input {item['path']} has the name of the script or a shared input")
        check_manifest([*shared, item], settings)  # folder/file clashes and the total size
    check_uploaded(session, account_id, clean)
    return clean


def _execution_row(batch: Batch, account_id: int, index: int, item: dict) -> dict:
    """The row of the batch's execution ``index``: the template with this input."""
    template = batch.template
    manifest = [*template["inputs"], item]
    return {
        "id": execution_id_for(batch.id, index),
        "account_id": account_id,
        "status": Status.QUEUED.value,
        "runtime": batch.runtime,
        "script_name": batch.script_name,
        "script_hash": batch.script_hash,
        "sources": template.get("sources"),
        "source_digest": template.get("source_digest"),
        "module": template.get("module"),
        "dependency_source": template.get("dependency_source"),
        "requirements": template["requirements"],
        "refresh_deps": template["refresh_deps"],
        "inputs": manifest,
        "input_hash": cache_keys.input_hash(manifest),
        "input_cache_hit": False,
        "files_uploaded": 0,
        "bytes_uploaded": 0,
        "args": [item["path"], *template["args"]],
        "timeout_s": template["timeout_s"],
        "memory_bytes": template["memory_bytes"],
        "cpus": template["cpus"],
        "stdin": False,
        "script_cache_hit": False,
        "outputs": [],
        "cancel_requested": False,
        "batch_id": batch.id,
        "batch_item": item["path"],
        "superseded": False,
    }


def start(
    session_factory: sessionmaker[Session], account_id: int, batch_id: str, enqueue: Enqueue
) -> list[str]:
    """Close the batch to new inputs and hand its first executions to the queue."""
    with session_scope(session_factory) as session:
        batch = _locked(session, account_id, batch_id)
        if batch.started_at is None:
            if batch.next_index == 0:
                raise BadInput(f"batch {batch.id} has no inputs")
            batch.started_at = utcnow()
    # One page here, so the request stays short however large the batch; each execution
    # that ends (and beat) hands on the next pages.
    return dispatch(session_factory, batch_id, enqueue, pages=1)


def _in_flight(session: Session, batch_id: str) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Execution)
        .where(
            Execution.batch_id == batch_id,
            Execution.dispatched_at.is_not(None),
            Execution.status.not_in(TERMINAL_STATUSES),
        )
    )


def _claim(session_factory: sessionmaker[Session], batch_id: str, most: int) -> list[str]:
    """Mark up to ``most`` held-back executions dispatched, under the batch's lock; returns
    their ids, to be enqueued once this has committed."""
    with session_scope(session_factory) as session:
        batch = session.scalars(
            select(Batch).where(Batch.id == batch_id).with_for_update()
        ).one_or_none()
        if batch is None or batch.started_at is None or batch.cancelled_at is not None:
            return []
        if batch.parallel is not None:
            most = min(most, batch.parallel - _in_flight(session, batch_id))
        if most <= 0:
            return []
        ids = list(
            session.scalars(
                select(Execution.id)
                .where(
                    Execution.batch_id == batch_id,
                    Execution.dispatched_at.is_(None),
                    Execution.status == Status.QUEUED,
                )
                .order_by(Execution.id)
                .limit(most)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            session.execute(
                update(Execution).where(Execution.id.in_(ids)).values(dispatched_at=utcnow())
            )
        return ids


def dispatch(
    session_factory: sessionmaker[Session],
    batch_id: str,
    enqueue: Enqueue,
    pages: int | None = None,
) -> list[str]:
    """Hand as many executions to the queue as the batch's ``parallel`` allows now, a page at
    a time (each marked in its own transaction, enqueued after it commits), at most ``pages``
    pages. One the queue refused goes back to waiting, for the next dispatch to hand on."""
    queued: list[str] = []
    for _page in itertools.count() if pages is None else range(pages):
        ids = _claim(session_factory, batch_id, PAGE_SIZE)
        for position, execution_id in enumerate(ids):
            try:
                enqueue(execution_id)
            except Exception:
                with session_scope(session_factory) as session:
                    session.execute(
                        update(Execution)
                        .where(Execution.id.in_(ids[position:]))
                        .values(dispatched_at=None)
                    )
                raise
            queued.append(execution_id)
        if len(ids) < PAGE_SIZE:
            break
    return queued


def after_execution(
    session_factory: sessionmaker[Session], execution_id: str, enqueue: Enqueue
) -> list[str]:
    """An execution has ended (or a step of it ran): if it belongs to a batch that holds
    executions back, hand on the next ones."""
    with session_scope(session_factory) as session:
        row = session.execute(
            select(Execution.batch_id, Execution.status).where(Execution.id == execution_id)
        ).one_or_none()
    if row is None or row.batch_id is None or row.status not in TERMINAL_STATUSES:
        return []
    return dispatch(session_factory, row.batch_id, enqueue)


def dispatch_stalled(session_factory: sessionmaker[Session], enqueue: Enqueue) -> list[str]:
    """Beat's backstop: every started batch that still holds executions back is dispatched,
    in case the worker that should have handed them on died first."""
    with session_scope(session_factory) as session:
        batch_ids = list(
            session.scalars(
                select(Batch.id)
                .where(Batch.started_at.is_not(None), Batch.cancelled_at.is_(None))
                .where(
                    select(Execution.id)
                    .where(
                        Execution.batch_id == Batch.id,
                        Execution.dispatched_at.is_(None),
                        Execution.status == Status.QUEUED,
                    )
                    .exists()
                )
            )
        )
    queued: list[str] = []
    for batch_id in batch_ids:
        queued += dispatch(session_factory, batch_id, enqueue)
    return queued


def cancel(
    session_factory: sessionmaker[Session],
    account_id: int,
    batch_id: str,
    cancel_execution: Callable[[str], object],
    release: Callable[[str], object] = lambda execution_id: None,
) -> int:
    """Stop the whole batch: nothing more is dispatched; every execution still ``queued``
    (held back, or in the queue but not started) ends ``cancelled`` at once, in one statement
    (its steps then find it over; ``release`` drops what it had in Redis); each one already
    building or running is cancelled as a single run is (``cancel_execution``:
    ``cancelling.cancel``, which stops its sandbox). Returns how many were still unfinished."""
    with session_scope(session_factory) as session:
        batch = _locked(session, account_id, batch_id)
        batch.cancelled_at = batch.cancelled_at or utcnow()
        # A step that started meanwhile has moved the row on, and is cancelled below like a
        # running one.
        ended = lifecycle.cancel_queued(session, Execution.batch_id == batch.id)
    for execution_id, dispatched_at in ended:
        if dispatched_at is not None:
            release(execution_id)
    count = len(ended)
    for page in _pages(
        session_factory,
        lambda: select(Execution.id).where(
            Execution.batch_id == batch_id, Execution.status.not_in(TERMINAL_STATUSES)
        ),
    ):
        for execution_id in page:
            cancel_execution(execution_id)
            count += 1
    return count


def _pages(
    session_factory: sessionmaker[Session], query: Callable, size: int = PAGE_SIZE
) -> Iterator[list[str]]:
    """Ids from ``query()`` (a select of Execution.id) in pages by id, each page read in its
    own short transaction."""
    after = ""
    while True:
        with session_scope(session_factory) as session:
            page = list(
                session.scalars(
                    query().where(Execution.id > after).order_by(Execution.id).limit(size)
                )
            )
        if not page:
            return
        yield page
        after = page[-1]
