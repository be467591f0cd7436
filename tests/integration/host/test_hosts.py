"""A grid of three worker hosts: three Docker engines of their own (scripts/hosts.py), each with
a Celery worker bound to it and its own data folder, sharing this session's PostgreSQL, Redis
and bucket. Work is queued as the API queues it; what a user sees is read from the rows."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from rgrid.core import cache_keys, queueing
from rgrid.core.db import session_scope
from rgrid.core.models import DependencyCache, Execution, utcnow
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.host import environments
from scripts import hosts
from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig
from tests.conftest import stored_log, stored_phases
from tests.wheels import make_wheel

HOSTS = ("h1", "h2", "h3")


class Grid:
    def __init__(self, stack: Stack, app, queue: str):
        self.stack, self.app, self.queue = stack, app, queue

    def engine(self, name: str) -> hosts.Engine:
        return next(e for e in self.stack.config.engines if e.name == name)

    def enqueue(self, ids: list[str]) -> None:
        for execution_id in ids:
            queueing.enqueue_pipeline(self.app, execution_id)


@pytest.fixture(scope="module")
def grid(server_settings, tmp_path_factory) -> Iterator[Grid]:
    queue = f"{os.environ['RGRID_QUEUE']}-grid"
    env = {
        **os.environ,
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_QUEUE": queue,
        "RGRID_ALLOW_LOCAL_FIND_LINKS": "1",
        "RGRID_POOL_SIZE": "1",
        "RGRID_POOL_MAX": "3",
    }
    config = StackConfig(
        env=env,
        log_dir=tmp_path_factory.mktemp("grid"),
        name=f"grid-{free_port()}",
        api_port=0,
        roles=("worker",),
        supervised=False,
        hosts=len(HOSTS),
    )
    app = queueing.create_celery_app()
    app.conf.task_default_queue = queue
    with Stack(config) as stack:
        yield Grid(stack, app, queue)
    from rgrid.service.context import redis_client

    client = redis_client(server_settings.redis_url)
    # Its registry, and the broker's bindings of its queues (this module's own names).
    for pattern in (cache_keys.deployment_keys_pattern(queue), f"_kombu.binding*{queue}*"):
        for key in client.scan_iter(pattern):
            client.delete(key)


def _rows(ctx, ids: list[str]) -> list[Execution]:
    with session_scope(ctx.session_factory) as session:
        rows = [session.get(Execution, i) for i in ids]
        session.expunge_all()
    return rows


def _wait_terminal(ctx, ids: list[str], timeout_s: float = 150) -> list[Execution]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(ctx, ids)
        if all(r.status in TERMINAL_STATUSES for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _stdout(ctx, execution_id: str) -> str:
    return stored_log(ctx, execution_id, "stdout")


SCRIPT = (
    "import sys, {module}\n"
    "line = f'{{ {module}.VERSION }}-{{sys.argv[1]}}'\n"
    "print(line)\n"
    "open('outputs/result.txt', 'w').write(line)\n"
)


def test_thirty_runs_over_three_hosts_resolve_once_and_install_once_per_host(
    ctx, grid, submit, tmp_path
):
    dist = f"grid-pkg-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    script = SCRIPT.format(module=dist.replace("-", "_"))
    ids = [submit(script, requirements=requirements, args=[str(i)]) for i in range(30)]
    grid.enqueue(ids)

    rows = _wait_terminal(ctx, ids)

    assert [r.status for r in rows] == ["succeeded"] * 30, [
        (r.status, r.error, r.exit_code, _stdout(ctx, r.id), stored_log(ctx, r.id, "stderr"))
        for r in rows
        if r.status != "succeeded"
    ]
    for i, row in enumerate(rows):
        expected = f"1.0-{i}"
        assert _stdout(ctx, row.id) == expected + "\n"
        assert [o["path"] for o in row.outputs] == ["result.txt"]
        assert row.outputs[0]["sha256"] == hashlib.sha256(expected.encode()).hexdigest()
        assert row.host in HOSTS
    phases = {row.id: stored_phases(ctx, row.id) for row in rows}
    resolves = [i for i, p in phases.items() if any(t.startswith("resolving") for t in p)]
    assert len(resolves) == 1, phases
    installs = Counter(
        row.host
        for row in rows
        if any(t.startswith(("resolving", "installing")) for t in phases[row.id])
    )
    assert installs and max(installs.values()) == 1, installs
    # The set was installed on each host that ran it, from the pins (a folder of its own).
    ran_on = {row.host for row in rows}
    assert len(ran_on) >= 2, ran_on
    assert set(installs) == ran_on
    for host in ran_on:
        folder = grid.engine(host).data_dir / "environments" / rows[0].environment
        assert folder.is_dir(), folder
    # Once more: whichever host looks it up, it runs where the set is, as a cache hit.
    again = submit(script, requirements=requirements, args=["again"])
    grid.enqueue([again])
    (row,) = _wait_terminal(ctx, [again])
    assert row.status == "succeeded" and row.host in ran_on
    assert row.script_cache_hit and row.dependency_cache_hit


def test_the_nightly_purge_removes_a_stale_environment_on_every_host(ctx, grid, submit, tmp_path):
    dist = f"grid-purge-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    script = SCRIPT.format(module=dist.replace("-", "_"))
    ids = [
        submit(script, requirements=f"--find-links {tmp_path}\n{dist}\n", args=[str(i)])
        for i in range(9)
    ]
    grid.enqueue(ids)
    rows = _wait_terminal(ctx, ids)
    assert [r.status for r in rows] == ["succeeded"] * 9, [(r.status, r.error) for r in rows]
    environment = rows[0].environment
    folders = [grid.engine(h).data_dir / "environments" / environment for h in HOSTS]
    installed = [f for f in folders if f.is_dir()]
    assert len(installed) == len({r.host for r in rows}) >= 1
    # Each host compiles the folder's bytecode in the background after its first run, and
    # the compile's marker file makes the folder recent again: wait for it before aging it.
    deadline = time.monotonic() + 120
    while not all((f / environments.COMPILED_MARKER).exists() for f in installed):
        assert time.monotonic() < deadline, "bytecode never compiled"
        time.sleep(0.2)
    # Unused for 40 days, on every host that has it.
    long_ago = time.time() - 40 * 86400
    for folder in installed:
        os.utime(folder, (long_ago, long_ago))
    with session_scope(ctx.session_factory) as session:
        row = session.scalars(
            select(DependencyCache).where(DependencyCache.environment == environment)
        ).one()
        row.last_used_at = utcnow() - timedelta(days=40)

    grid.app.send_task(queueing.PURGE_CACHES)

    deadline = time.monotonic() + 60
    while any(f.exists() for f in folders) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [f for f in folders if f.exists()] == []


def test_executions_waiting_on_a_host_that_is_gone_move_to_a_live_one(ctx, grid, submit):
    # Pinned to a host whose worker and engine died with the next step in its queue: the
    # row is all that is left of them.
    ids = [submit("print('moved')\n") for _ in range(3)]
    with session_scope(ctx.session_factory) as session:
        for execution_id in ids:
            session.get(Execution, execution_id).host = "h-gone"

    grid.app.send_task(queueing.SWEEP_LOST_WORKERS)

    rows = _wait_terminal(ctx, ids, timeout_s=60)
    assert [r.status for r in rows] == ["succeeded"] * 3, [(r.status, r.error) for r in rows]
    assert {r.host for r in rows} <= set(HOSTS)
    assert all(_stdout(ctx, r.id) == "moved\n" for r in rows)


def test_a_host_whose_engine_stops_mid_batch_strands_nothing_and_gets_no_later_work(
    ctx, grid, submit
):
    script = "import sys, time\ntime.sleep(0.5)\nprint('done', sys.argv[1])\n"
    ids = [submit(script, args=[str(i)]) for i in range(24)]
    grid.enqueue(ids)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [r for r in _rows(ctx, ids) if r.status in TERMINAL_STATUSES]
        if len(done) >= 4:
            break
        time.sleep(0.2)
    assert hosts.stop(grid.engine("h2"))

    rows = _wait_terminal(ctx, ids)

    assert all(r.status in TERMINAL_STATUSES for r in rows), [(r.id, r.status) for r in rows]
    for i, row in enumerate(rows):
        if row.status == "succeeded":
            assert _stdout(ctx, row.id) == f"done {i}\n"
        else:  # cut short on the stopped host: it says so
            assert row.error, row.id
    assert sum(r.status == "succeeded" for r in rows) >= len(rows) - 4
    later = [submit(script, args=[f"later-{i}"]) for i in range(6)]
    grid.enqueue(later)
    rows = _wait_terminal(ctx, later)
    assert [r.status for r in rows] == ["succeeded"] * 6, [(r.status, r.error) for r in rows]
    assert {r.host for r in rows} <= {"h1", "h3"}
