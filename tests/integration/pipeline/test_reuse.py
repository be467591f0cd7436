"""The output cache on the real services (PostgreSQL, S3, Redis, Docker): a succeeded run is
recorded by its action key, answered at submission, kept through the retention purge while
it is live, and never answered across accounts or with a blob that is gone."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update

from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.models import Blob, Execution, OutputCache, utcnow
from rgrid.pipeline import reuse
from rgrid.pipeline.chain import run_all
from rgrid.service import purge
from rgrid.service.accounts import get_or_create_account
from rgrid.service.executions import create_execution, execution_to_dict, read_logs

SCRIPT = (
    "import os, uuid\nos.makedirs('outputs', exist_ok=True)\n"
    "open('outputs/token.txt', 'w').write(uuid.uuid4().hex)\nprint('ran')\n"
)


def _submit(ctx, account_id: int, *, reuse_it: bool = True, run: bool = True) -> dict:
    """Submit as the API does (create, then the output-cache lookup); run it unless answered."""
    with session_scope(ctx.session_factory) as session:
        execution = create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account_id,
            script=SCRIPT,
            script_name="job.py",
            args=["a"],
        )
        image = reuse.grid_runtime_image(ctx.hosts.client, ctx.settings.queue, "python:3.11")
        answered = reuse.at_submission(
            session,
            ctx.store,
            ctx.settings,
            execution,
            env=None,
            runtime_image=image,
            reuse=reuse_it,
        )
        execution_id = execution.id
    if not answered and run:
        run_all(ctx, execution_id)
        ctx.join_background()
    with session_scope(ctx.session_factory) as session:
        return execution_to_dict(session.get(Execution, execution_id))


def test_a_succeeded_run_answers_the_next_without_running(ctx, account):
    first = _submit(ctx, account.id)
    assert first["status"] == "succeeded" and first["output_cache_hit"] is False
    second = _submit(ctx, account.id)
    assert second["reused_from"] == first["execution_id"]
    assert second["outputs"] == first["outputs"]  # the same blobs, referenced
    assert second["host"] is None and second["sandbox_warm"] is None
    with session_scope(ctx.session_factory) as session:
        row = session.get(Execution, second["execution_id"])
        page = read_logs(row, ctx.logs, ctx.store)
        entry = session.scalars(
            select(OutputCache).where(OutputCache.account_id == account.id)
        ).one()
        assert entry.use_count == 1 and entry.execution_id == first["execution_id"]
    assert page["complete"]
    assert "".join(text for stream, text in page["chunks"] if stream == "stdout") == "ran\n"


def test_another_account_is_a_miss(ctx, account):
    mine = _submit(ctx, account.id)
    with session_scope(ctx.session_factory) as session:
        other = get_or_create_account(session, f"reuse-other-{account.id}").id
    theirs = _submit(ctx, other, run=False)
    assert theirs["reused_from"] is None and theirs["output_cache_hit"] is False
    assert theirs["status"] == "queued"
    assert _submit(ctx, account.id, run=False)["reused_from"] == mine["execution_id"]


def test_a_lost_log_drops_the_entry(ctx, account):
    first = _submit(ctx, account.id)
    ctx.store.delete(cache_keys.log_object_key(first["execution_id"]))
    second = _submit(ctx, account.id, run=False)
    assert second["reused_from"] is None and second["status"] == "queued"
    with session_scope(ctx.session_factory) as session:
        left = session.scalars(select(OutputCache).where(OutputCache.account_id == account.id))
        assert list(left) == []


def test_the_retention_purge_keeps_what_a_live_entry_replays(ctx, account):
    first = _submit(ctx, account.id)
    reused = _submit(ctx, account.id)
    assert reused["reused_from"] == first["execution_id"]
    long_ago = utcnow() - timedelta(days=400)
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Execution)
            .where(Execution.id.in_([first["execution_id"], reused["execution_id"]]))
            .values(finished_at=long_ago)
        )
    with session_scope(ctx.session_factory) as session:
        purge.purge_old_executions(ctx.store, session, timedelta(days=30))
    with session_scope(ctx.session_factory) as session:
        # The reused one went; the original stays while its entry is live, with its log
        # and its output blobs.
        assert session.get(Execution, reused["execution_id"]) is None
        assert session.get(Execution, first["execution_id"]) is not None
        digest = first["outputs"][0]["sha256"]
        blob = session.scalars(
            select(Blob).where(Blob.account_id == account.id, Blob.digest == digest)
        ).one()
        assert ctx.store.exists(blob.object_key)
    assert ctx.store.exists(cache_keys.log_object_key(first["execution_id"]))
    assert _submit(ctx, account.id, run=False)["reused_from"] == first["execution_id"]

    # Once the entry is unused past the cache's TTL it goes, and then the original may too.
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(OutputCache)
            .where(OutputCache.account_id == account.id)
            .values(last_used_at=long_ago)
        )
        assert reuse.drop_entries(session, account.id, utcnow() - timedelta(days=30)) == 1
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Execution)
            .where(Execution.account_id == account.id, Execution.reused_from.is_not(None))
            .values(finished_at=long_ago)
        )
    # The reused executions go first; the original, which they replayed, on the next pass.
    for _ in range(2):
        with session_scope(ctx.session_factory) as session:
            purge.purge_old_executions(ctx.store, session, timedelta(days=30))
    with session_scope(ctx.session_factory) as session:
        assert session.get(Execution, first["execution_id"]) is None


# --- a batch's page, looked up at once ------------------------------------------------------

BATCH_SCRIPT = (
    "import os, sys, uuid\nos.makedirs('outputs', exist_ok=True)\n"
    "text = open(sys.argv[1]).read()\n"
    "open('outputs/out.txt', 'w').write(text.upper() + ' ' + uuid.uuid4().hex)\n"
)


def _batch_inputs(ctx, account, folder, texts: dict[str, str]) -> list[dict]:
    import hashlib

    from rgrid.store.blobs import store_file

    items = []
    for name, text in texts.items():
        path = folder / name
        path.write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        with session_scope(ctx.session_factory) as session:
            store_file(session, ctx.store, account.id, path, digest)
        items.append({"path": name, "sha256": digest, "size": len(text)})
    return items


def _image(ctx):
    return lambda runtime: reuse.grid_runtime_image(ctx.hosts.client, ctx.settings.queue, runtime)


def _fill(ctx, account, items: list[dict], **options) -> tuple[str, dict]:
    """Create and fill a batch as the API does (with the store and the grid's image)."""
    from rgrid.service import batches

    with session_scope(ctx.session_factory) as session:
        batch_id = batches.create_batch(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script=BATCH_SCRIPT,
            script_name="upper.py",
            runtime="python:3.11",
            **options,
        ).id
    with session_scope(ctx.session_factory) as session:
        added = batches.add_page(
            session,
            ctx.settings,
            account.id,
            batch_id,
            items,
            store=ctx.store,
            runtime_image=_image(ctx),
        )
    return batch_id, added


def _start_and_run(ctx, account, batch_id: str) -> list[str]:
    """Start the batch and run what it queues in this process; returns the ids queued."""
    from rgrid.service import batches

    queued: list[str] = []
    batches.start(ctx.session_factory, account.id, batch_id, queued.append)
    for execution_id in queued:
        run_all(ctx, execution_id)
    ctx.join_background()
    return queued


def _run_batch(ctx, account, items: list[dict], **options) -> tuple[str, dict, list[str]]:
    batch_id, added = _fill(ctx, account, items, **options)
    return batch_id, added, _start_and_run(ctx, account, batch_id)


def _batch_rows(ctx, batch_id: str) -> dict[str, dict]:
    with session_scope(ctx.session_factory) as session:
        rows = session.scalars(select(Execution).where(Execution.batch_id == batch_id))
        return {row.batch_item: execution_to_dict(row) for row in rows}


def test_a_batch_page_is_looked_up_in_one_query_and_only_misses_are_queued(ctx, account, tmp_path):
    from sqlalchemy import event

    from rgrid.service import batch_views, batches

    texts = {f"in{n}.txt": f"item {n}" for n in range(6)}
    first_id, added, queued = _run_batch(ctx, account, _batch_inputs(ctx, account, tmp_path, texts))
    assert added == {"total": 6, "reused": 0} and len(queued) == 6
    first = _batch_rows(ctx, first_id)
    assert {row["status"] for row in first.values()} == {"succeeded"}

    # One input changed, one original's log lost from the store: those two run, the rest are
    # answered at once, in one query of the output cache for the whole page.
    texts["in2.txt"] = "item two, changed"
    ctx.store.delete(cache_keys.log_object_key(first["in4.txt"]["execution_id"]))
    items = _batch_inputs(ctx, account, tmp_path, texts)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    engine = ctx.session_factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        second_id, added = _fill(ctx, account, items, reuse=True)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    queued = _start_and_run(ctx, account, second_id)
    assert added == {"total": 6, "reused": 4}
    lookups = [s for s in statements if "FROM output_cache" in s and "SELECT" in s]
    assert len(lookups) == 1, lookups
    second = _batch_rows(ctx, second_id)
    assert sorted(name for name, row in second.items() if row["reused_from"] is None) == [
        "in2.txt",
        "in4.txt",
    ]
    assert sorted(queued) == sorted(second[name]["execution_id"] for name in ("in2.txt", "in4.txt"))
    for name in ("in0.txt", "in1.txt", "in3.txt", "in5.txt"):
        row = second[name]
        assert row["status"] == "succeeded" and row["output_cache_hit"] is True
        assert row["reused_from"] == first[name]["execution_id"]
        assert row["outputs"] == first[name]["outputs"]  # the same blobs, referenced
        assert row["host"] is None and row["sandbox_warm"] is None
    for name in ("in2.txt", "in4.txt"):
        assert second[name]["status"] == "succeeded" and second[name]["output_cache_hit"] is False
        assert second[name]["host"] is not None
    with session_scope(ctx.session_factory) as session:
        status = batch_views.batch_to_dict(session, session.get(batches.Batch, second_id))
        assert status["reused"] == 4 and status["counts"] == {"succeeded": 6} and status["done"]
        entries = {
            e.execution_id: e
            for e in session.scalars(
                select(OutputCache).where(OutputCache.account_id == account.id)
            )
        }
        # The lost log's entry was dropped and replaced by the run that answered it again.
        assert first["in4.txt"]["execution_id"] not in entries
        assert second["in4.txt"]["execution_id"] in entries
        assert entries[first["in0.txt"]["execution_id"]].use_count == 1
        # A reused one's log is the original's output, replayed.
        row = session.get(Execution, second["in0.txt"]["execution_id"])
        page = read_logs(row, ctx.logs, ctx.store)
    assert page["complete"]
    assert any("reused" in text for stream, text in page["chunks"] if stream == "system")

    # Without --reuse (and the default off) every input runs; --refresh too.
    _, added, queued = _run_batch(ctx, account, items)
    assert added["reused"] == 0 and len(queued) == 6
    _, added, queued = _run_batch(ctx, account, items, reuse=True, refresh=True)
    assert added["reused"] == 0 and len(queued) == 6


def test_the_reuse_default_applies_to_batches(ctx, account, tmp_path):
    from dataclasses import replace

    from rgrid.service import batches

    items = _batch_inputs(ctx, account, tmp_path, {"a.txt": "a", "b.txt": "b"})
    _run_batch(ctx, account, items)
    on = replace(ctx.settings, reuse_default=True)
    for settings, expected in ((on, 2), (ctx.settings, 0)):
        with session_scope(ctx.session_factory) as session:
            batch_id = batches.create_batch(
                session,
                ctx.store,
                settings,
                account_id=account.id,
                script=BATCH_SCRIPT,
                script_name="upper.py",
                runtime="python:3.11",
            ).id
        with session_scope(ctx.session_factory) as session:
            added = batches.add_page(
                session,
                settings,
                account.id,
                batch_id,
                items,
                store=ctx.store,
                runtime_image=_image(ctx),
            )
        assert added["reused"] == expected
    # --no-reuse beats the default.
    with session_scope(ctx.session_factory) as session:
        batch_id = batches.create_batch(
            session,
            ctx.store,
            on,
            account_id=account.id,
            script=BATCH_SCRIPT,
            script_name="upper.py",
            runtime="python:3.11",
            reuse=False,
        ).id
    with session_scope(ctx.session_factory) as session:
        added = batches.add_page(
            session, on, account.id, batch_id, items, store=ctx.store, runtime_image=_image(ctx)
        )
    assert added["reused"] == 0


def test_a_run_whose_log_is_incomplete_or_cut_short_is_not_recorded(ctx, account):
    first = _submit(ctx, account.id)
    with session_scope(ctx.session_factory) as session:
        session.execute(delete(OutputCache).where(OutputCache.account_id == account.id))
    for column, value in (("log_incomplete", "3 chunk(s) lost"), ("cut_short", "killed: oom")):
        with session_scope(ctx.session_factory) as session:
            row = session.get(Execution, first["execution_id"])
            setattr(row, column, value)
            reuse.record(session, ctx.settings, row)
            assert (
                session.scalars(
                    select(OutputCache).where(OutputCache.account_id == account.id)
                ).all()
                == []
            )
            setattr(row, column, None)
    with session_scope(ctx.session_factory) as session:
        reuse.record(session, ctx.settings, session.get(Execution, first["execution_id"]))
    with session_scope(ctx.session_factory) as session:
        assert (
            len(
                session.scalars(
                    select(OutputCache).where(OutputCache.account_id == account.id)
                ).all()
            )
            == 1
        )


def test_a_run_cut_at_the_log_limit_is_not_recorded(ctx, account):
    from dataclasses import replace

    small = replace(ctx, settings=replace(ctx.settings, max_log_bytes=2000))
    with session_scope(ctx.session_factory) as session:
        execution = create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script="print('x' * 100_000)\n",
            script_name="loud.py",
        )
        execution_id = execution.id
    run_all(small, execution_id)
    ctx.join_background()
    with session_scope(ctx.session_factory) as session:
        row = session.get(Execution, execution_id)
        assert row.status == "succeeded"
        assert row.log_incomplete.startswith("log truncated at")
        assert row.action_key is not None
        assert (
            session.scalars(select(OutputCache).where(OutputCache.account_id == account.id)).all()
            == []
        )
