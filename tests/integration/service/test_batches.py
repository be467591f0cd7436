"""Batches on the real services: pages of inputs, dispatch bounded by ``parallel`` under a row
lock, counts from the rows, cancel and retry. The pipeline runs in this process for the
executions the batch hands on (the e2e tests run them on a real worker)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace

import pytest

from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.core.models import Execution
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.pipeline.chain import run_all
from rgrid.service import batch_retry, batch_views, batches
from rgrid.service.cancelling import cancel
from rgrid.store.blobs import store_file

SCRIPT = """\
import sys
text = open(sys.argv[1]).read()
if "bad" in text:
    sys.exit(3)
import os
os.makedirs("outputs", exist_ok=True)
open("outputs/upper.txt", "w").write(text.upper())
"""


def _inputs(ctx, account, tmp_path, contents: list[str]) -> list[dict]:
    items = []
    for number, text in enumerate(contents):
        path = tmp_path / f"in{number}.txt"
        path.write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        with session_scope(ctx.session_factory) as session:
            store_file(session, ctx.store, account.id, path, digest)
        items.append({"path": f"in{number}.txt", "sha256": digest, "size": len(text)})
    return items


def _batch(ctx, account, items: list[dict], settings=None, **options) -> str:
    with session_scope(ctx.session_factory) as session:
        batch = batches.create_batch(
            session,
            ctx.store,
            settings or ctx.settings,
            account_id=account.id,
            script=SCRIPT,
            script_name="upper.py",
            runtime="python:3.11",
            **options,
        )
        batch_id = batch.id
    with session_scope(ctx.session_factory) as session:
        batches.add_inputs(session, ctx.settings, account.id, batch_id, items)
    return batch_id


def _counts(ctx, batch_id: str) -> dict[str, int]:
    with session_scope(ctx.session_factory) as session:
        return batch_views.counts(session, batch_id)


def _rows(ctx, batch_id: str) -> list[Execution]:
    with session_scope(ctx.session_factory) as session:
        rows = session.query(Execution).filter(Execution.batch_id == batch_id).all()
        session.expunge_all()
        return rows


def test_parallel_bounds_what_is_queued_and_each_end_hands_on_the_next(ctx, account, tmp_path):
    items = _inputs(ctx, account, tmp_path, ["a", "b", "bad", "d", "e"])
    batch_id = _batch(ctx, account, items, parallel=2)
    queued: list[str] = []
    assert batches.start(ctx.session_factory, account.id, batch_id, queued.append) == queued
    assert len(queued) == 2
    assert all(execution_id.startswith(batch_id) for execution_id in queued)
    # Dispatching again while both run hands on nothing: the bound holds.
    assert batches.dispatch(ctx.session_factory, batch_id, queued.append) == []
    while len(set(queued)) < 5 or _counts(ctx, batch_id).get("queued"):
        running = [i for i in queued if i not in {r.id for r in _done(ctx, batch_id)}]
        run_all(ctx, running[0])
        batches.after_execution(ctx.session_factory, running[0], queued.append)
    assert len(queued) == len(set(queued)) == 5
    assert _counts(ctx, batch_id) == {"succeeded": 4, "failed": 1}
    rows = {row.batch_item: row for row in _rows(ctx, batch_id)}
    assert rows["in0.txt"].args == ["in0.txt"]
    assert [o["path"] for o in rows["in0.txt"].outputs] == ["upper.txt"]


def _held(ctx, batch_id: str) -> list[str]:
    return [r.id for r in _rows(ctx, batch_id) if r.status == "queued" and not r.dispatched_at]


def _done(ctx, batch_id: str) -> list[Execution]:
    return [row for row in _rows(ctx, batch_id) if row.status in TERMINAL_STATUSES]


def test_concurrent_dispatchers_never_queue_one_execution_twice(ctx, account, tmp_path):
    items = _inputs(ctx, account, tmp_path, [str(n) for n in range(30)])
    batch_id = _batch(ctx, account, items, parallel=7)
    with session_scope(ctx.session_factory) as session:
        session.get(batches.Batch, batch_id).started_at = batches.utcnow()
    queued: list[str] = []
    lock = threading.Lock()

    def enqueue(execution_id: str) -> None:
        with lock:
            queued.append(execution_id)

    threads = [
        threading.Thread(target=batches.dispatch, args=(ctx.session_factory, batch_id, enqueue))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(queued) == len(set(queued)) == 7


def test_cancel_ends_every_execution_and_retry_runs_only_the_failed(ctx, account, tmp_path):
    items = _inputs(ctx, account, tmp_path, ["ok", "bad", "fine"])
    batch_id = _batch(ctx, account, items, parallel=1)
    queued: list[str] = []
    batches.start(ctx.session_factory, account.id, batch_id, queued.append)
    run_all(ctx, queued[0])
    batches.after_execution(ctx.session_factory, queued[0], queued.append)
    run_all(ctx, queued[1])  # "bad": fails
    stopped = batches.cancel(ctx.session_factory, account.id, batch_id, lambda i: cancel(ctx, i))
    assert stopped == 1  # the third, never handed on
    assert _counts(ctx, batch_id) == {"succeeded": 1, "failed": 1, "cancelled": 1}
    # Nothing is handed on once cancelled.
    assert batches.after_execution(ctx.session_factory, queued[1], queued.append) == []

    retried_queue: list[str] = []
    retried = batch_retry.retry(
        ctx.session_factory, account.id, batch_id, retried_queue.append, ctx.settings
    )
    assert sorted(retried) == sorted(r.id for r in _rows(ctx, batch_id) if r.superseded)
    assert sorted(retried.values()) == sorted(retried_queue + _held(ctx, batch_id))
    assert len(retried) == 2 and len(retried_queue) == 1  # parallel 1
    assert _counts(ctx, batch_id) == {"succeeded": 1, "queued": 2}
    for execution_id in retried_queue:
        run_all(ctx, execution_id)
    batches.after_execution(ctx.session_factory, retried_queue[0], retried_queue.append)
    run_all(ctx, retried_queue[1])
    assert _counts(ctx, batch_id) == {"succeeded": 2, "failed": 1}
    assert len(_rows(ctx, batch_id)) == 5


def test_bad_batches_are_refused(ctx, account, tmp_path):
    items = _inputs(ctx, account, tmp_path, ["x"])
    with pytest.raises(BadInput, match="was not uploaded"):
        _batch(ctx, account, [{**items[0], "sha256": "0" * 64}])
    with pytest.raises(BadInput, match="parallel"):
        _batch(ctx, account, items, parallel=0)
    with pytest.raises(BadInput, match="over the limit of 2 per batch"):
        _batch(ctx, account, items, size=3, settings=replace(ctx.settings, max_batch_executions=2))
    with pytest.raises(BadInput, match="script or a shared input"):
        _batch(ctx, account, [{**items[0], "path": "upper.py"}])
    # Refused when the batch is made, as a single execution is: not once per execution later.
    strict = replace(ctx.settings, allowed_indexes=())
    with pytest.raises(BadInput, match="package index 127.0.0.1 is not allowed on this server"):
        _batch(ctx, account, items, strict, requirements="--index-url http://127.0.0.1/s\nsix\n")
    batch_id = _batch(ctx, account, items)
    batches.start(ctx.session_factory, account.id, batch_id, lambda i: None)
    with pytest.raises(BadInput, match="has started"), session_scope(ctx.session_factory) as s:
        batches.add_inputs(s, ctx.settings, account.id, batch_id, items)
    with session_scope(ctx.session_factory) as session:
        empty = batches.create_batch(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script=SCRIPT,
            script_name="upper.py",
            runtime="python:3.11",
        ).id
    with pytest.raises(BadInput, match="no inputs"):
        batches.start(ctx.session_factory, account.id, empty, lambda i: None)


def test_a_large_unbounded_batch_is_handed_on_a_page_at_a_time(ctx, account, tmp_path):
    (item,) = _inputs(ctx, account, tmp_path, ["same"])
    items = [{**item, "path": f"f{n:04d}.txt"} for n in range(1001)]
    batch_id = _batch(ctx, account, items[:1000])
    with session_scope(ctx.session_factory) as session:
        assert batches.add_inputs(session, ctx.settings, account.id, batch_id, items[1000:]) == 1001
    queued: list[str] = []
    batches.start(ctx.session_factory, account.id, batch_id, queued.append)
    assert len(queued) == batches.PAGE_SIZE
    # Any execution's end (or beat) hands on the rest.
    assert batches.dispatch_stalled(ctx.session_factory, queued.append) == queued[1000:]
    assert len(set(queued)) == 1001

    # Cancelling ends every queued one in one statement, without a per-execution cancel.
    called: list[str] = []
    released: list[str] = []
    stopped = batches.cancel(
        ctx.session_factory, account.id, batch_id, called.append, released.append
    )
    assert stopped == 1001 and called == [] and len(released) == 1001
    assert _counts(ctx, batch_id) == {"cancelled": 1001}
