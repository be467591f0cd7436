"""The output cache on the real services (PostgreSQL, S3, Redis, Docker): a succeeded run is
recorded by its action key, answered at submission, kept through the retention purge while
it is live, and never answered across accounts or with a blob that is gone."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from rgrid import cache_keys, purge, reuse
from rgrid.accounts import get_or_create_account
from rgrid.db import session_scope
from rgrid.executions import create_execution, execution_to_dict, read_logs
from rgrid.models import Blob, Execution, OutputCache, utcnow
from rgrid.pipeline import run_all

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
