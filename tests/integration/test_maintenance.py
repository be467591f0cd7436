"""Beat's jobs on the real database and Docker engine: reaping and the 30-day purge."""

import secrets
import time
from datetime import timedelta

import docker
import pytest

from rgrid.db import session_scope
from rgrid.docker_engine import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.maintenance import purge_script_cache, reap_containers
from rgrid.models import ScriptCache, utcnow


@pytest.fixture
def make_container():
    client = docker.from_env()
    made = []

    def _make(execution_id: str, deadline: int):
        container = client.containers.create(
            "rgrid-runtime:python-3.11",
            command=["sleep", "600"],
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
    now = int(time.time())
    ours_done = make_container(finished["execution_id"], now + 3600)
    foreign_live = make_container(secrets.token_hex(8), now + 3600)
    foreign_dead = make_container(secrets.token_hex(8), now - 1)
    with session_scope(ctx.session_factory) as session:
        removed = reap_containers(ctx.docker, session)
    assert finished["execution_id"] in removed
    assert not _exists(ours_done)
    assert _exists(foreign_live)  # another installation's running execution
    assert not _exists(foreign_dead)


def test_purge_drops_entries_unused_for_30_days_and_their_images(ctx, run_script):
    old = run_script("print('old')\n")
    recent = run_script("print('recent')\n")
    with session_scope(ctx.session_factory) as session:
        row = session.query(ScriptCache).filter_by(image_ref=old["image_ref"]).one()
        row.last_used_at = utcnow() - timedelta(days=31)
    with session_scope(ctx.session_factory) as session:
        assert purge_script_cache(ctx.docker, session) >= 1
    with session_scope(ctx.session_factory) as session:
        refs = {r.image_ref for r in session.query(ScriptCache)}
    assert old["image_ref"] not in refs and recent["image_ref"] in refs
    client = docker.from_env()
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(old["image_ref"])
    client.images.get(recent["image_ref"])
    again = run_script("print('old')\n")  # a purged entry is simply a miss next time
    assert again["status"] == "succeeded" and again["script_cache_hit"] is False


def test_purge_drops_unused_dependency_images_and_blobs(ctx, run_script):
    from rgrid import blobs
    from rgrid.maintenance import purge_blobs, purge_dependency_cache
    from rgrid.models import Blob, DependencyCache

    old = run_script(
        "import six\nopen('outputs/o.txt','w').write('old output')\n",
        requirements="six==1.16.0\n",
    )
    assert old["status"] == "succeeded", old["error"]
    month_ago = utcnow() - timedelta(days=31)
    with session_scope(ctx.session_factory) as session:
        account_id = (
            session.query(ScriptCache).filter_by(image_ref=old["image_ref"]).one().account_id
        )
        for model in (ScriptCache, DependencyCache, Blob):
            for row in session.query(model).filter_by(account_id=account_id):
                row.last_used_at = month_ago
        blob_key = blobs.find_blob(session, account_id, old["outputs"][0]["sha256"]).object_key
    with session_scope(ctx.session_factory) as session:
        purge_script_cache(ctx.docker, session)
    with session_scope(ctx.session_factory) as session:
        assert purge_dependency_cache(ctx.docker, session) == 1
    with session_scope(ctx.session_factory) as session:
        assert purge_blobs(ctx.store, session) >= 1
    client = docker.from_env()
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(old["dependency_image"])
    assert not ctx.store.exists(blob_key)
    again = run_script("import six\n", requirements="six==1.16.0\n")
    assert again["status"] == "succeeded" and again["dependency_cache_hit"] is False


def test_sweeper_ends_executions_no_worker_will_finish(ctx, submit):
    from rgrid import executions as svc
    from rgrid.maintenance import sweep_lost_executions

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
