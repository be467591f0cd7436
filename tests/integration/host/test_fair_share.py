"""Issue 26, item 3: one account's slow builds do not starve another account's run.

A real worker host (run pool of two slots, build pool of two) on a queue of its own, the
real PostgreSQL, Redis and Docker; account A's two builds trickle from a slow index while
account B's one-line script is submitted."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from celery import Celery
from sqlalchemy import update

from rgrid.core import cache_keys, queueing
from rgrid.core.db import session_scope
from rgrid.core.models import Account, Execution
from rgrid.host.slots import fair_share
from scripts.launcher import Stack
from tests.index_server import trickling_index


def _status(ctx, execution_id: str) -> str:
    with session_scope(ctx.session_factory) as session:
        return session.get(Execution, execution_id).status


def _wait_for(ctx, execution_id: str, statuses: set[str], within_s: float) -> str:
    """The status once it is one of ``statuses``, or the last seen at the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        status = _status(ctx, execution_id)
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("slots", "accounts", "cap", "share"),
    [(2, 1, 0, 2), (2, 2, 0, 1), (4, 3, 0, 2), (2, 5, 0, 1), (8, 1, 4, 4), (8, 2, 0, 4)],
)
def test_an_accounts_share_is_bounded_by_the_slots_and_the_accounts_sharing_them(
    slots, accounts, cap, share
):
    assert fair_share(slots, accounts, cap) == share


def _finish_the_sessions_other_work(ctx) -> None:
    """Only this test's rows count among those sharing. Earlier tests of the session leave
    executions ``queued`` that no worker will ever take (test_batches' held-back batch
    members, test_api's submissions without a worker): each of their accounts would count as
    waiting, and three or more accounts sharing two build slots leave A a share of one."""
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Execution)
            .where(Execution.status.in_(["queued", "building", "running"]))
            .values(status="error", error="ended by test_fair_share")
        )


@dataclass
class WorkerHost:
    stack: Stack
    app: Celery  # queues on the host's own queue
    queue: str


@pytest.fixture
def worker_host(ctx, server_settings, tmp_path) -> Iterator[WorkerHost]:
    """One worker host as `make up` starts it: run pool and build pool, two slots each,
    and the default per-account cap (4, above the two run slots). On a queue of its own:
    the chains earlier tests left on the session's queue (submitted through the API with no
    worker running) are not its work, and would hold its run slots before B's run."""
    from scripts.devenv import free_port
    from scripts.launcher import StackConfig
    from tests.conftest import retire_sandboxes

    name = f"fair-{free_port()}"
    queue = f"{os.environ['RGRID_QUEUE']}-{name}"
    _finish_the_sessions_other_work(ctx)
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(tmp_path / "worker-data"),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_ALLOWED_INDEXES": "127.0.0.1",
        "RGRID_ALLOW_LOCAL_FIND_LINKS": "1",
        "RGRID_QUEUE": queue,
    }
    config = StackConfig(
        env=env,
        log_dir=tmp_path / "logs",
        name=name,
        api_port=0,
        roles=("worker",),
        supervised=False,
        concurrency=2,
        build_concurrency=2,
    )
    app = queueing.create_celery_app()
    app.conf.task_default_queue = queue
    try:
        with Stack(config) as stack:
            assert set(stack.processes) == {"worker", "builder"}
            yield WorkerHost(stack, app, queue)
    finally:
        retire_sandboxes(tmp_path / "worker-data")
        from rgrid.service.context import redis_client

        client = redis_client(server_settings.redis_url)
        # Its registry, and the broker's bindings of its queues (this fixture's own names).
        for pattern in (cache_keys.deployment_keys_pattern(queue), f"_kombu.binding*{queue}*"):
            for key in client.scan_iter(pattern):
                client.delete(key)


def test_two_slow_builds_of_one_account_do_not_keep_anothers_run_queued(
    ctx, worker_host, submit, account
):
    with session_scope(ctx.session_factory) as session:
        other = Account(name=f"acct-{secrets.token_hex(4)}")
        session.add(other)
        session.flush()
        other_id = other.id
    app = worker_host.app
    with trickling_index() as index:
        builds = [
            submit(
                f"print('A{n}')\n",
                requirements=f"--index-url {index.url()}\nslowpkg{secrets.token_hex(3)}\n",
            )
            for n in range(2)
        ]
        try:
            for execution_id in builds:
                queueing.enqueue_pipeline(app, execution_id)
            for execution_id in builds:
                assert _wait_for(ctx, execution_id, {"building"}, 120) == "building"
            theirs = submit("print('hello from B')\n", account_id=other_id)
            queued_at = time.monotonic()
            queueing.enqueue_pipeline(app, theirs)
            # B's first run starts while A's two installs trickle on.
            assert _wait_for(ctx, theirs, {"running", "succeeded"}, 10) in {
                "running",
                "succeeded",
            }
            # The README's fault table quotes this (pytest -s).
            print(f"B's run started {time.monotonic() - queued_at:.1f} s after it was queued")
            assert _wait_for(ctx, theirs, {"succeeded", "failed", "error"}, 60) == "succeeded"
            assert [_status(ctx, b) for b in builds] == ["building", "building"]
            assert index.requests  # uv did reach the slow index
        finally:
            # The worker host stops with the fixture: A's builds end with it, not later in
            # another test's view of who is sharing the slots.
            with session_scope(ctx.session_factory) as session:
                session.execute(
                    update(Execution)
                    .where(Execution.id.in_(builds))
                    .values(status="error", error="test over")
                )


def test_a_host_whose_build_pool_is_not_running_installs_in_its_run_pool(
    ctx, worker_host, submit, tmp_path
):
    """A host started without its build pool (rgrid-builder.service not enabled, or
    stopped) must not hand its installs to a build queue nothing consumes: they would wait
    ``queued`` for ever. The run pool installs them itself, in a run slot, and says so."""
    from rgrid.core import cache_keys
    from rgrid.host.hosts import HostRegistry
    from rgrid.service.context import redis_client
    from rgrid.store.logbuffer import decode_log
    from scripts.processes import stop_group
    from tests.wheels import make_wheel

    registry = HostRegistry(redis_client(ctx.settings.redis_url), worker_host.queue)
    host = socket.gethostname()  # the stack's workers have no RGRID_HOST_NAME
    deadline = time.monotonic() + 60
    while not registry.build_pool_alive(host):
        assert time.monotonic() < deadline, "the build pool never said it was alive"
        time.sleep(0.2)
    stop_group(worker_host.stack.processes.pop("builder").pid)
    # Said as it stops, not only once its heartbeat expires.
    assert not registry.build_pool_alive(host)

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = f"rgrid-solo-{secrets.token_hex(3)}"
    make_wheel(wheels, dist, "1.0")
    module = dist.replace("-", "_")
    execution_id = submit(
        f"import {module}\nprint('solo', {module}.VERSION)\n",
        requirements=f"--find-links {wheels}\n{dist}\n",
    )
    queueing.enqueue_pipeline(worker_host.app, execution_id)
    ended = {"succeeded", "failed", "error", "build_failed", "timed_out"}
    assert _wait_for(ctx, execution_id, ended, 120) == "succeeded"
    chunks = decode_log(ctx.store.get_bytes(cache_keys.log_object_key(execution_id)))
    text = "".join(t for _, t in chunks)
    assert "solo 1.0" in text
    assert "no build pool on this host: installing in a run slot" in text


def _set_status(ctx, execution_id: str, status: str) -> None:
    with session_scope(ctx.session_factory) as session:
        session.get(Execution, execution_id).status = status


def _may_run(ctx, execution_id: str, slots: int) -> bool:
    from rgrid.core.statuses import Status
    from rgrid.host.slots import AccountBusy, take_slot

    with session_scope(ctx.session_factory) as session:
        try:
            take_slot(session, session.get(Execution, execution_id), Status.RUNNING, slots)
        except AccountBusy:
            return False
    return True


def test_an_account_alone_uses_every_run_slot_and_shares_them_once_another_waits(
    ctx, submit, account
):
    with session_scope(ctx.session_factory) as session:
        other = Account(name=f"acct-{secrets.token_hex(4)}")
        session.add(other)
        session.flush()
        other_id = other.id
    # Only this test's rows count among those sharing: the session's others are finished.
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Execution)
            .where(Execution.status.in_(["queued", "building", "running"]))
            .values(status="error")
        )
    first, second, third = (submit(f"print({n})\n") for n in range(3))
    _set_status(ctx, first, "running")
    assert _may_run(ctx, second, slots=2)  # alone: both slots
    theirs = submit("print('B')\n", account_id=other_id)  # B waits: A's share is now 1
    assert not _may_run(ctx, second, slots=2)
    assert _may_run(ctx, theirs, slots=2)
    assert _may_run(ctx, second, slots=4)  # four slots for two accounts: two each
    _set_status(ctx, second, "running")
    assert not _may_run(ctx, third, slots=4)
    for execution_id in (first, second, third, theirs):
        _set_status(ctx, execution_id, "error")
