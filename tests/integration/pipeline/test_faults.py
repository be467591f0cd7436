"""Cancelling, losing a worker, and services failing under the pipeline, on the real
PostgreSQL, Redis, S3 endpoint and Docker. Each test asserts how the execution ended, how long
that took, and that no sandbox is left."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import docker
import pytest
from sqlalchemy import text

from rgrid.client.remote import RemoteClient
from rgrid.core.db import session_scope
from rgrid.core.errors import ServiceUnavailable
from rgrid.core.models import Execution
from rgrid.host import sandbox
from rgrid.pipeline.build import build_step
from rgrid.pipeline.chain import run_all
from rgrid.pipeline.hash import hash_step
from rgrid.pipeline.lookup import cache_lookup_step
from rgrid.pipeline.lost import sweep_lost_workers
from rgrid.pipeline.run import run_step
from rgrid.service.cancelling import cancel
from rgrid.store.s3store import S3Store
from tests.conftest import TICKER, retire_sandboxes
from tests.integration.pipeline.test_pipeline import _leftovers, _log

REPO = Path(__file__).resolve().parents[3]


def _row(ctx, execution_id: str) -> Execution:
    with session_scope(ctx.session_factory) as session:
        return session.get(Execution, execution_id)


def _wait_for(predicate, within_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within_s, f"not {what} within {within_s}s"
        time.sleep(0.1)
    return time.monotonic() - started


def _live_log(ctx, execution_id: str) -> str:
    return "".join(text for _, text in ctx.logs.read(execution_id))


def _no_sandbox(execution_id: str) -> bool:
    name = f"{sandbox.RUN_NAME_PREFIX}{execution_id}"
    return not docker.from_env().api.containers(all=True, filters={"name": name})


def test_cancel_before_it_runs_ends_it_at_once_and_nothing_runs(ctx, submit):
    execution_id = submit(TICKER)
    assert cancel(ctx, execution_id) == ("cancelled", True)
    row = _row(ctx, execution_id)
    assert (row.status, row.error) == ("cancelled", "cancelled")
    # The chain, delivered later, finds it over: no sandbox is ever claimed.
    run_all(ctx, execution_id)
    assert _row(ctx, execution_id).status == "cancelled"
    assert _row(ctx, execution_id).started_at is None
    assert _no_sandbox(execution_id)
    assert ("system", "cancelled before it ran\n") in _log(ctx, execution_id)
    # Cancelling again changes nothing.
    assert cancel(ctx, execution_id) == ("cancelled", False)


def test_cancel_while_running_stops_the_script_within_a_second(ctx, submit):
    execution_id = submit(TICKER)
    runner = threading.Thread(target=run_all, args=(ctx, execution_id))
    runner.start()
    _wait_for(lambda: "tick 2" in _live_log(ctx, execution_id), 30, "ticking")
    started = time.monotonic()
    assert cancel(ctx, execution_id) == ("running", True)
    runner.join(15)
    took = time.monotonic() - started
    assert not runner.is_alive()
    row = _row(ctx, execution_id)
    assert row.status == "cancelled" and row.exit_code is None
    assert took < 3, took
    log = _log(ctx, execution_id)
    # Joined: the script's stdout is unbuffered, so a line may arrive in pieces.
    assert "tick 2\n" in "".join(t for s, t in log if s == "stdout")
    assert ("system", "cancelled: the script was stopped\n") in log
    assert _leftovers(ctx, execution_id) == []


def test_a_lost_worker_is_noticed_within_its_lease(ctx, submit, server_settings, tmp_path):
    """The process running the script is SIGKILLed: the sweep ends the execution `error`
    within the lease (here 3 s), with the log it streamed, and removes its sandbox. The
    worker has a host folder of its own: killed, it may leave a half-started pool sandbox."""
    execution_id = submit(TICKER)
    worker_data = tmp_path / "worker-data"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                from dataclasses import replace
                from pathlib import Path
                from rgrid.core.config import Settings
                from rgrid.service.context import server_context
                from rgrid.pipeline.chain import run_all
                settings = replace(
                    Settings.from_env(), data_dir=Path({str(worker_data)!r}), lease_s=3
                )
                run_all(server_context(settings), {execution_id!r})
                """
            ),
        ],
        env={**os.environ, "RGRID_DATABASE_URL": server_settings.database_url},
        cwd=REPO,
    )
    try:
        _wait_for(lambda: _row(ctx, execution_id).status == "running", 60, "running")
        _wait_for(lambda: "tick 1" in _live_log(ctx, execution_id), 30, "ticking")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = time.monotonic()
        sweeper = replace(ctx, settings=replace(ctx.settings, lease_s=3))
        swept: list[str] = []
        _wait_for(
            lambda: swept.extend(sweep_lost_workers(sweeper)) or execution_id in swept,
            30,
            "declared lost",
        )
        took = time.monotonic() - killed_at
    finally:
        worker.kill()
        retire_sandboxes(worker_data)
    row = _row(ctx, execution_id)
    assert row.status == "error"
    assert row.error.startswith("worker lost: ")
    assert took < 3 + 5, took
    assert "tick 1\n" in "".join(t for s, t in _log(ctx, execution_id) if s == "stdout")
    assert _wait_for(lambda: _no_sandbox(execution_id), 10, "sandbox removed") < 10
    # A redelivered run step finds it over and runs nothing.
    run_step(ctx, execution_id)
    assert _row(ctx, execution_id).status == "error"


def test_unreadable_cache_tables_make_a_miss_not_a_failure(ctx, run_script, database_url):
    """The run goes on without the cache, and says so."""
    from sqlalchemy import create_engine

    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    hidden = f"script_cache_hidden_{secrets.token_hex(3)}"
    with engine.connect() as conn:
        conn.execute(text(f"ALTER TABLE script_cache RENAME TO {hidden}"))
    try:
        execution = run_script("print('still runs')\n")
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"ALTER TABLE {hidden} RENAME TO script_cache"))
        engine.dispose()
    assert execution["status"] == "succeeded", execution["error"]
    assert execution["script_cache_hit"] is False
    notes = [t for s, t in _log(ctx, execution["execution_id"]) if s == "system"]
    assert any(t.startswith("cache unavailable (") for t in notes), notes
    assert _leftovers(ctx, execution["execution_id"]) == []


def test_a_lost_bucket_is_made_again(server_settings):
    """The test S3 endpoint keeps everything in memory: after a restart the bucket is gone."""
    store = S3Store(
        server_settings.s3_endpoint_url,
        f"rgrid-lost-{secrets.token_hex(4)}",
        server_settings.s3_region,
    )
    store.put_bytes("scripts/1/x.py", b"print(1)\n")
    assert store.get_bytes("scripts/1/x.py") == b"print(1)\n"


def test_the_store_step_retries_a_store_blip(ctx, submit, monkeypatch):
    """A momentary object-store failure retries the step (Celery's autoretry), instead of
    ending the execution `error`."""
    from workers import tasks

    execution_id = submit("print('ok')\n")
    for step in (hash_step, cache_lookup_step, build_step):
        step(ctx, execution_id)
    run_step(ctx, execution_id)

    real_put = ctx.store.put_stream  # the log is streamed to the store
    failures = {"left": 1}

    def flaky_put(key: str, stream) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ServiceUnavailable("object store unreachable: connection refused")
        real_put(key, stream)

    monkeypatch.setattr(ctx.store, "put_stream", flaky_put)
    monkeypatch.setattr(tasks, "worker_context", lambda: ctx)
    monkeypatch.setattr(tasks.store_task, "retry_backoff", False)
    result = tasks.store_task.apply(args=[execution_id])
    assert result.successful(), result.traceback
    assert failures["left"] == 0
    assert _row(ctx, execution_id).status == "succeeded"


class _Flaky(http.server.BaseHTTPRequestHandler):
    """An API that answers 503 twice, then the execution."""

    answers: list[tuple[int, dict]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = self.answers.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_the_cli_rides_out_a_restarting_api():
    _Flaky.answers = [
        (503, {"error": "database unavailable"}),
        (503, {"error": "database unavailable"}),
        (200, {"execution_id": "e" * 16, "status": "succeeded"}),
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RemoteClient(f"http://127.0.0.1:{server.server_port}", "k", retry_s=30)
        assert client.get("e" * 16)["status"] == "succeeded"
        assert _Flaky.answers == []
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: it gives up after its bounded time, naming what it could not reach.
    gone = RemoteClient(f"http://127.0.0.1:{server.server_port}", "k", retry_s=1.5)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="cannot reach the RGrid API"):
        gone.get("e" * 16)
    assert 1.0 < time.monotonic() - started < 10


def test_the_api_answers_503_when_redis_is_down(server_settings, ctx, submit):
    from rgrid.api import create_app
    from rgrid.service import accounts

    app = create_app(replace(server_settings, redis_url="redis://127.0.0.1:9/0"))
    with session_scope(ctx.session_factory) as session:
        account = accounts.get_or_create_account(session, f"redis-down-{secrets.token_hex(3)}")
        _row_, secret = accounts.issue_key(session, account)
        account_id = account.id
    execution_id = submit("print(1)\n", account_id=account_id)
    response = app.test_client().get(
        f"/v1/executions/{execution_id}/logs", headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 503
    assert response.json == {"error": "the queue and log service (Redis) is unavailable"}


def test_supervise_restarts_what_exits_and_stops_with_it(tmp_path):
    marker = tmp_path / "starts"
    loop = subprocess.Popen(
        [str(REPO / "scripts" / "supervise.sh"), "sh", "-c", f"echo start >> {marker}; exit 3"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= 2, 10, "restarted")
    loop.send_signal(signal.SIGTERM)
    assert loop.wait(10) == 0
    assert "exited with status 3; starting it again" in (loop.stderr.read() if loop.stderr else "")


def _postgres_cluster() -> tuple[str, str]:
    line = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout.split("\n")[0]
    version, name = line.split()[:2]
    return version, name


def test_a_database_restart_mid_run_loses_nothing_and_runs_nothing_twice(ctx, submit):
    """PostgreSQL goes away while the script runs and comes back after it ended: the result
    waits for it instead of being lost, and the script is not run again to recover it."""
    script = "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('done', flush=True)\n"
    execution_id = submit(script)
    runner = threading.Thread(target=run_all, args=(ctx, execution_id))
    runner.start()
    _wait_for(lambda: "started" in _live_log(ctx, execution_id), 60, "started")
    version, name = _postgres_cluster()
    subprocess.run(["pg_ctlcluster", version, name, "stop", "-m", "fast"], check=True)
    try:
        time.sleep(6)  # the script ends while the database is down
    finally:
        subprocess.run(["pg_ctlcluster", version, name, "start"], check=True)
    came_back = time.monotonic()
    runner.join(120)
    assert not runner.is_alive()
    row = _row(ctx, execution_id)
    assert row.status == "succeeded", row.error
    stdout = "".join(t for s, t in _log(ctx, execution_id) if s == "stdout")
    assert stdout == "started\ndone\n"
    print(f"terminal {time.monotonic() - came_back:.1f}s after the database came back")
    assert _leftovers(ctx, execution_id) == []


def test_cancel_while_building_ends_it_at_once_and_nothing_runs(ctx, submit, tmp_path):
    """The install is slow (an index that takes seconds to answer): cancelling during it ends
    the execution at once, and when the install finishes no sandbox is started."""
    import functools

    from tests.wheels import make_wheel

    dist = f"slowpkg-{secrets.token_hex(3)}"
    make_wheel(tmp_path, dist, "1.0")

    class SlowIndex(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", ""):
                time.sleep(6)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(SlowIndex, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        requirements = f"--find-links http://127.0.0.1:{server.server_port}/\n{dist}\n"
        execution_id = submit(f"import {dist.replace('-', '_')}\n", requirements=requirements)
        runner = threading.Thread(target=run_all, args=(ctx, execution_id))
        runner.start()
        _wait_for(lambda: _row(ctx, execution_id).status == "building", 30, "building")
        started = time.monotonic()
        assert cancel(ctx, execution_id) == ("cancelled", True)
        assert time.monotonic() - started < 1
        assert _row(ctx, execution_id).status == "cancelled"
        runner.join(60)
        assert not runner.is_alive()
    finally:
        server.shutdown()
        server.server_close()
    row = _row(ctx, execution_id)
    assert (row.status, row.started_at) == ("cancelled", None)
    assert _no_sandbox(execution_id)
