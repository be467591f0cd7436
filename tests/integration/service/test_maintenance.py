"""Beat's jobs on the real database and Docker engine: reaping and the 30-day purge."""

import os
import secrets
import time
from datetime import timedelta

import docker
import pytest

from rgrid.core.cache_keys import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.core.db import session_scope
from rgrid.core.models import ScriptCache, utcnow
from rgrid.host.sandbox import POOL_NAME_PREFIX, RUN_NAME_PREFIX
from rgrid.service.maintenance import reap_containers
from rgrid.service.purge import purge_script_cache


@pytest.fixture
def make_container():
    """A sandbox-like container as a runner leaves it behind: named for its execution (or,
    with ``name``, e.g. an unclaimed pool sandbox), labelled with its deadline."""
    client = docker.from_env()
    made = []

    def _make(execution_id: str, deadline: int, name: str | None = None):
        container = client.containers.create(
            "rgrid-runtime:python-3.11",
            command=["sleep", "600"],
            name=name or f"{RUN_NAME_PREFIX}{execution_id}",
            network_mode="none",
            labels={
                MANAGED_LABEL: "1",
                EXECUTION_LABEL: execution_id,
                DEADLINE_LABEL: str(deadline),
            },
        )
        made.append(container)
        return container

    yield _make
    for container in made:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def _exists(container) -> bool:
    return bool(docker.from_env().containers.list(all=True, filters={"id": container.id}))


def test_reaper_spares_live_and_foreign_containers_and_removes_abandoned_ones(
    ctx, run_script, make_container
):
    finished = run_script("pass\n")
    # Its own sandbox exits and removes itself just after the run: then the name is free.
    name = {"name": RUN_NAME_PREFIX + finished["execution_id"]}
    deadline = time.monotonic() + 10
    while ctx.docker.api.containers(all=True, filters=name) and time.monotonic() < deadline:
        time.sleep(0.1)
    now = int(time.time())
    ours_done = make_container(finished["execution_id"], now + 3600)
    foreign_live = make_container(secrets.token_hex(8), now + 3600)
    foreign_dead = make_container(secrets.token_hex(8), now - 1)
    # Unclaimed pool sandboxes end themselves when idle; the reaper leaves them be.
    pooled = make_container(
        secrets.token_hex(8), now - 1, name=f"{POOL_NAME_PREFIX}test-{secrets.token_hex(4)}"
    )
    with session_scope(ctx.session_factory) as session:
        removed = reap_containers(ctx.docker, session, ctx.settings.sandboxes_dir)
    assert finished["execution_id"] in removed
    assert not _exists(ours_done)
    assert _exists(foreign_live)  # another installation's running execution
    assert not _exists(foreign_dead)
    assert _exists(pooled)


def test_reaper_deletes_host_folders_whose_sandbox_is_gone(ctx):
    root = ctx.settings.sandboxes_dir
    root.mkdir(parents=True, exist_ok=True)
    orphan = root / f"rgrid-run-{secrets.token_hex(8)}"
    (orphan / "work" / "outputs").mkdir(parents=True)
    (orphan / "work" / "outputs" / "left.txt").write_text("x")
    two_minutes_ago = time.time() - 120
    os.utime(orphan, (two_minutes_ago, two_minutes_ago))
    starting = root / f"rgrid-pool-{secrets.token_hex(8)}"  # its sandbox may be starting
    starting.mkdir()
    try:
        with session_scope(ctx.session_factory) as session:
            reap_containers(ctx.docker, session, root)
        assert not orphan.exists()
        assert starting.exists()
    finally:
        starting.rmdir()


def _last_used_31_days_ago(ctx, model, **key) -> None:
    """Age one cache row past the purge's 30 days."""
    with session_scope(ctx.session_factory) as session:
        session.query(model).filter_by(**key).one().last_used_at = utcnow() - timedelta(days=31)


def test_purge_drops_script_entries_unused_for_30_days(ctx, run_script, account):
    old = run_script("print('old')\n")
    recent = run_script("print('recent')\n")
    _last_used_31_days_ago(
        ctx, ScriptCache, account_id=account.id, script_hash=old["source_digest"]
    )
    with session_scope(ctx.session_factory) as session:
        assert purge_script_cache(session) >= 1
    with session_scope(ctx.session_factory) as session:
        hashes = {
            r.script_hash for r in session.query(ScriptCache).filter_by(account_id=account.id)
        }
    assert hashes == {recent["source_digest"]}
    again = run_script("print('old')\n")  # a purged entry is simply a miss next time
    assert again["status"] == "succeeded" and again["script_cache_hit"] is False


def test_purge_drops_unused_environments_and_blobs(ctx, run_script, account):
    from rgrid.core.models import Blob, DependencyCache
    from rgrid.service.purge import purge_blobs, purge_dependency_cache
    from rgrid.store import blobs

    old = run_script(
        "import six\nopen('outputs/o.txt','w').write('old output')\n",
        requirements="six==1.16.0\n",
    )
    assert old["status"] == "succeeded", old["error"]
    folder = ctx.settings.environments_dir / old["environment"]
    assert folder.is_dir()
    month_ago = utcnow() - timedelta(days=31)
    with session_scope(ctx.session_factory) as session:
        for model in (ScriptCache, DependencyCache, Blob):
            for row in session.query(model).filter_by(account_id=account.id):
                row.last_used_at = month_ago
        blob_key = blobs.find_blob(session, account.id, old["outputs"][0]["sha256"]).object_key
    with session_scope(ctx.session_factory) as session:
        purge_script_cache(session)
    with session_scope(ctx.session_factory) as session:
        assert purge_dependency_cache(session, ctx.settings.environments_dir) == 1
    with session_scope(ctx.session_factory) as session:
        assert purge_blobs(ctx.store, session) >= 1
    assert not folder.exists()
    assert not ctx.store.exists(blob_key)
    again = run_script("import six\n", requirements="six==1.16.0\n")
    assert again["status"] == "succeeded" and again["dependency_cache_hit"] is False
    assert again["environment"] == old["environment"] and folder.is_dir()


def test_purge_keeps_an_environment_another_entry_still_uses(ctx, run_script, account, tmp_path):
    """Two texts that resolve to the same set share one folder: purging one entry leaves the
    folder to the other."""
    from rgrid.core.models import DependencyCache
    from rgrid.service.purge import purge_dependency_cache
    from tests.wheels import make_wheel

    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    stale = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}==1.0\n")
    live = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}>=1\n")
    assert stale["environment"] == live["environment"]
    _last_used_31_days_ago(
        ctx, DependencyCache, account_id=account.id, dependency_hash=stale["dependency_hash"]
    )
    with session_scope(ctx.session_factory) as session:
        assert purge_dependency_cache(session, ctx.settings.environments_dir) == 1
    assert (ctx.settings.environments_dir / live["environment"]).is_dir()
    again = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}>=1\n")
    assert again["dependency_cache_hit"] is True and again["deps_build_s"] is None


def test_sweeper_ends_executions_no_worker_will_finish(ctx, submit):
    from rgrid.service import executions as svc
    from rgrid.service.maintenance import sweep_lost_executions

    stuck, fresh = submit("pass\n", timeout_s=60), submit("pass\n", timeout_s=60)
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, stuck)
        row.status = "running"
        row.created_at = utcnow() - timedelta(hours=3)
    with session_scope(ctx.session_factory) as session:
        lost = sweep_lost_executions(session)
    assert stuck in lost and fresh not in lost
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, stuck)
        assert row.status == "error" and row.error.startswith("lost")
        assert session.get(svc.Execution, fresh).status == "queued"
