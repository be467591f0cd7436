"""The nightly purge, as beat queues it, on a real Celery worker: it removes what went unused
(cache rows, blobs, abandoned uploads, old executions and their logs) once for the grid, each
worker host removes its own environments and blob-cache files, and the result reports counts
and bytes."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from rgrid.core import cache_keys, queueing
from rgrid.core.db import session_scope
from rgrid.core.models import (
    Blob,
    DependencyCache,
    Execution,
    OutputCache,
    ScriptCache,
    Upload,
    utcnow,
)
from rgrid.host import disk, environments
from rgrid.pipeline.chain import run_all
from rgrid.service.context import redis_client, server_context
from rgrid.service.executions import create_execution, execution_to_dict
from scripts.launcher import Stack, StackConfig
from tests.conftest import retire_sandboxes
from tests.wheels import make_wheel

LONG_AGO = timedelta(days=40)


@pytest.fixture
def host(server_settings, tmp_path) -> Iterator:
    """A worker host: a Celery worker on a queue of its own, and the same host's pipeline in
    this process (to make what the purge will find)."""
    queue = f"rgrid-purge-{secrets.token_hex(4)}"
    settings = replace(server_settings, data_dir=tmp_path / "host", queue=queue)
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(settings.data_dir),
        "RGRID_DATABASE_URL": settings.database_url,
        "RGRID_REDIS_URL": settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": settings.s3_bucket,
        "RGRID_QUEUE": queue,
    }
    config = StackConfig(
        env=env,
        log_dir=tmp_path / "logs",
        name=f"purge-{queue}",
        api_port=0,
        roles=("worker",),
        supervised=False,
    )
    ctx = server_context(settings)
    try:
        with Stack(config):
            yield ctx
    finally:
        ctx.join_background()
        retire_sandboxes(settings.data_dir)


def _run(ctx, account_id: int, script: str, **options) -> dict:
    with session_scope(ctx.session_factory) as session:
        execution_id = create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account_id,
            script=script,
            script_name="job.py",
            **options,
        ).id
    run_all(ctx, execution_id)
    ctx.join_background()
    with session_scope(ctx.session_factory) as session:
        return execution_to_dict(session.get(Execution, execution_id))


def _age_files(folder) -> None:
    then = time.time() - LONG_AGO.total_seconds()
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def _purge(ctx) -> dict:
    """Queue the purge by name, as beat does, and wait for its result."""
    from rgrid.core.queueing import create_celery_app

    app = create_celery_app()
    deadline = time.monotonic() + 60
    while True:  # until the worker consumes the queue
        replies = app.control.inspect(timeout=2).active_queues() or {}
        if any(q["name"] == ctx.settings.queue for qs in replies.values() for q in qs):
            break
        assert time.monotonic() < deadline, "the worker did not start"
    return app.send_task(queueing.PURGE_CACHES, queue=ctx.settings.queue).get(timeout=300)


def test_the_purge_removes_every_kind_and_reports_bytes(host, account, tmp_path):
    dist = f"purge-dep-{secrets.token_hex(3)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    old = _run(host, account.id, f"import {dist.replace('-', '_')}\n", requirements=requirements)
    assert old["status"] == "succeeded", old["error"]
    env_dir = host.settings.environments_dir / old["environment"]
    assert env_dir.is_dir()
    data = secrets.token_bytes(1000)
    with session_scope(host.session_factory) as session:
        from rgrid.store import blobs

        source = tmp_path / "input.bin"
        source.write_bytes(data)
        digest = __import__("hashlib").sha256(data).hexdigest()
        blob, _ = blobs.store_file(session, host.store, account.id, source, digest)
        blob_key = blob.object_key
        session.add(
            Upload(
                id=secrets.token_hex(8),
                account_id=account.id,
                digest=digest,
                size=123,
                object_key=f"staging/{secrets.token_hex(8)}",
                created_at=utcnow() - timedelta(days=2),
            )
        )
    # A local copy in this host's blob cache, as a run that used it leaves one.
    blobs.cached_copy(host.store, blob_key, digest, host.settings.blob_cache_dir / "x")
    recent = _run(host, account.id, "print('recent')\n")

    # Everything of the first run, and the blob, went unused for 40 days.
    with session_scope(host.session_factory) as session:
        for model in (ScriptCache, DependencyCache, Blob, OutputCache):
            session.execute(
                update(model)
                .where(model.account_id == account.id, model.last_used_at < utcnow())
                .values(last_used_at=utcnow() - LONG_AGO)
            )
        session.execute(  # the recent run stays recent
            update(ScriptCache)
            .where(ScriptCache.script_hash == recent["source_digest"])
            .values(last_used_at=utcnow())
        )
        session.execute(
            update(Execution)
            .where(Execution.id == old["execution_id"])
            .values(finished_at=utcnow() - LONG_AGO)
        )
    # Its bytecode is compiled in the background after the run: wait, or the compile would
    # make the folder recent again after it was aged.
    deadline = time.monotonic() + 120
    while not (env_dir / environments.COMPILED_MARKER).exists():
        assert time.monotonic() < deadline, "bytecode never compiled"
        time.sleep(0.2)
    _age_files(env_dir)
    _age_files(host.settings.blob_cache_dir)
    usage = disk.usage(host.settings)

    result = _purge(host)

    shared = result["shared"]
    assert shared["script_cache"] >= 1 and shared["dependency_cache"] >= 1
    assert shared["blobs"] >= 1 and shared["blob_bytes"] >= 1000
    assert shared["uploads"] >= 1 and shared["upload_bytes"] >= 123
    assert shared["executions"] >= 1
    assert shared["output_cache"] >= 1  # the old run's, whose log it would have replayed
    (reply,) = result["hosts"].values()  # one worker host, which purged its own disk
    local = reply["ok"]
    assert local["environments"] == 1
    assert local["environment_bytes"] > 0
    assert local["blobs"] == usage["blob"][0]  # every aged blob-cache file
    assert local["blob_bytes"] == usage["blob"][1]

    assert not env_dir.exists()
    assert disk.usage(host.settings)["blob"] == (0, 0)
    with session_scope(host.session_factory) as session:
        mine = (ScriptCache.account_id == account.id,)
        assert set(session.scalars(select(ScriptCache.script_hash).where(*mine))) == {
            recent["source_digest"]
        }
        theirs = DependencyCache.account_id == account.id
        assert session.scalars(select(DependencyCache).where(theirs)).first() is None
        assert session.scalars(select(Blob).where(Blob.account_id == account.id)).first() is None
        assert session.get(Execution, old["execution_id"]) is None
        assert session.get(Execution, recent["execution_id"]) is not None
    assert not host.store.exists(blob_key)
    assert not host.store.exists(cache_keys.log_object_key(old["execution_id"]))
    redis = redis_client(host.settings.redis_url)
    assert redis.get(cache_keys.last_purge_key(host.settings.queue)) is not None


def test_a_second_purge_while_one_runs_does_nothing(host):
    """Exactly one purge at a time, even if two beats queue it: the second one sees the lock
    and reports that it skipped."""
    redis = redis_client(host.settings.redis_url)
    lock = redis.lock(cache_keys.purge_lock_name(host.settings.queue), timeout=60)
    assert lock.acquire(blocking=False)
    try:
        assert _purge(host) == {"skipped": "another purge is running"}
    finally:
        lock.release()
    assert "shared" in _purge(host)
