"""A host's disk budget: least recently used environments and blob-cache files go first, an
environment in use never does, and what was evicted is a miss next time, not an error."""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import replace

import docker
import pytest
from prometheus_client import REGISTRY

from rgrid.core import cache_keys
from rgrid.core.config import DEFAULT_RUNTIME
from rgrid.core.db import session_scope
from rgrid.core.models import Execution
from rgrid.host import disk, envlocks, pool, sandbox
from rgrid.host.runtimes import resolve_runtime
from rgrid.pipeline.chain import run_all
from rgrid.service.context import server_context
from rgrid.service.executions import create_execution, execution_to_dict
from tests.conftest import retire_sandboxes
from tests.integration.pipeline.test_pipeline import _log
from tests.wheels import make_wheel


@pytest.fixture
def host(server_settings, tmp_path):
    """A worker host of its own (its own environments and blob cache), budget 5 GiB."""
    settings = replace(server_settings, data_dir=tmp_path / "host", cache_budget="5g")
    ctx = server_context(settings)
    yield ctx
    ctx.join_background()
    retire_sandboxes(settings.data_dir)


def _run(ctx, account, script: str, **options) -> dict:
    with session_scope(ctx.session_factory) as session:
        execution_id = create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script=script,
            script_name="job.py",
            **options,
        ).id
    run_all(ctx, execution_id)
    ctx.join_background()
    with session_scope(ctx.session_factory) as session:
        return execution_to_dict(session.get(Execution, execution_id))


def _with_package(tmp_path, account, ctx, tag: str) -> tuple[str, str, dict]:
    dist = f"budget-{tag}-{secrets.token_hex(3)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    script = f"import {dist.replace('-', '_')} as m\nprint('{tag}', m.VERSION)\n"
    execution = _run(ctx, account, script, requirements=requirements)
    assert execution["status"] == "succeeded", execution["error"]
    return requirements, script, execution


def _environments(ctx) -> set[str]:
    return {e.path.name for e in disk.entries(ctx.settings) if e.kind == "environment"}


def _mounting(path) -> list[str]:
    client = docker.from_env()
    return [
        c["Names"][0]
        for c in client.api.containers(filters={"label": cache_keys.HOST_DIR_LABEL})
        if any(m.get("Source") == str(path) for m in c.get("Mounts") or [])
    ]


def _evicted(kind: str) -> float:
    return REGISTRY.get_sample_value("rgrid_evicted_total", {"kind": kind}) or 0.0


def test_least_recently_used_goes_first_and_never_one_in_use(host, account, tmp_path):
    settings = host.settings
    req_a, script_a, a = _with_package(tmp_path, account, host, "a")
    _, _, b = _with_package(tmp_path, account, host, "b")
    env_a, env_b = a["environment"], b["environment"]
    assert _environments(host) == {env_a, env_b}
    assert _mounting(settings.environments_dir / env_a)  # a warm sandbox waits for it
    hour_ago = time.time() - 3600
    os.utime(settings.environments_dir / env_a, (hour_ago, hour_ago))
    total = sum(e.size for e in disk.entries(settings))

    before = _evicted("environment")
    removed = disk.enforce_budget(settings, docker.from_env(), budget=total - 1)
    assert removed.counts == {"environment": 1}
    assert _environments(host) == {env_b}  # the least recently used went, the newer stayed
    assert _mounting(settings.environments_dir / env_a) == []  # its warm sandboxes with it
    assert _evicted("environment") - before == 1

    # In use: a run holds it. Even a budget of nothing keeps it (and the blob-cache files a
    # run may be about to place, used within the grace period).
    with envlocks.using(settings.environments_dir, env_b):
        assert disk.enforce_budget(settings, docker.from_env(), budget=0).counts == {}
    assert _environments(host) == {env_b}
    assert disk.enforce_budget(settings, docker.from_env(), budget=0).counts == {"environment": 1}
    assert _environments(host) == set()

    # Evicted is a miss next time, not an error: the pins are installed again.
    again = _run(host, account, script_a, requirements=req_a)
    assert again["status"] == "succeeded", again["error"]
    assert again["dependency_cache_hit"] is False
    notes = [t for s, t in _log(host, again["execution_id"]) if s == "system"]
    assert any("not on this host" in n for n in notes), notes
    assert env_a in _environments(host)


def test_the_budget_is_kept_after_each_run(server_settings, account, tmp_path):
    """A budget smaller than one environment: each run still succeeds, and leaves the host
    within its budget once its environment is no longer in use."""
    settings = replace(server_settings, data_dir=tmp_path / "tiny", cache_budget="1")
    ctx = server_context(settings)
    try:
        _, _, first = _with_package(tmp_path, account, ctx, "tiny")
        assert _environments(ctx) == set()
        assert _mounting(settings.environments_dir / first["environment"]) == []
        _, _, second = _with_package(tmp_path, account, ctx, "tiny2")
        assert second["dependency_cache_hit"] is False
        assert _environments(ctx) == set()
    finally:
        ctx.join_background()
        retire_sandboxes(settings.data_dir)


def test_an_eviction_waits_for_a_refill_and_leaves_no_warm_sandbox_on_the_removed_folder(host):
    """A refill that began on an environment before the budget evicted it (the run's own
    environment, with a budget smaller than it) must not leave a warm sandbox that mounts the
    removed folder: a script there would find no packages."""
    env_dir = host.settings.environments_dir / f"e{secrets.token_hex(8)}"
    env_dir.mkdir(parents=True)
    (env_dir / "marker.py").write_text("X = 1\n")
    env = sandbox.Environment(image=resolve_runtime(DEFAULT_RUNTIME).image, deps_dir=env_dir)
    refill_began, started = threading.Event(), []

    def slow_refill() -> None:
        with envlocks.refilling(env_dir) as present:
            refill_began.set()
            time.sleep(1.0)  # the eviction comes while this refill is still starting
            if present:
                started.append(pool.start(host.docker, env, host.limits, host.pool))

    refill = threading.Thread(target=slow_refill)
    refill.start()
    refill_began.wait(5)
    assert disk.remove_environment(host.settings, env_dir, host.docker)
    refill.join()
    assert len(started) == 1  # the eviction waited for it, then retired what it started
    assert not env_dir.exists()
    assert _mounting(env_dir) == []
    # A refill that comes after the eviction starts nothing.
    assert pool.fill(host.docker, env, host.limits, host.pool) == 0
    assert _mounting(env_dir) == []
