"""A run step's runner is killed while its script runs: the script runs once, and its log
holds every line once.

Only the Celery pool process running the step is SIGKILLed (found through the worker's
process tree): Celery redelivers the step (late acks, reject on worker lost), and the new
step re-attaches to the sandbox the script still runs in. Then the whole worker (main and
pool processes): its supervisor starts it again, the lease sweep sends the run step back to
the host, and it re-attaches in the same way. (The stack here runs with RGRID_LEASE=4.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import docker
from sqlalchemy import create_engine, text

from rgrid.host.sandbox import RUN_NAME_PREFIX
from tests.e2e.conftest import run_cli, run_json, start_cli

TICKS = 40
#: Prints one line when it starts (a second start would print a second one), then a tick
#: every 0.2 s: 8 s in all, so the runner is killed mid-run.
ONCE = (
    "import time, uuid\n"
    "print('started', uuid.uuid4().hex, flush=True)\n"
    f"for i in range({TICKS}):\n"
    "    print('tick', i, flush=True)\n"
    "    time.sleep(0.2)\n"
)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _row(env: dict[str, str], execution_id: str) -> dict:
    engine = create_engine(env["RGRID_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT status, worker, run_resends FROM executions WHERE id = :id"),
                {"id": execution_id},
            ).one()
    finally:
        engine.dispose()
    return dict(row._mapping)


def _newest_running(env: dict[str, str], script_name: str, within_s: float = 60) -> str:
    engine = create_engine(env["RGRID_DATABASE_URL"])
    deadline = time.monotonic() + within_s
    try:
        while True:
            with engine.connect() as connection:
                found = connection.execute(
                    text(
                        "SELECT id FROM executions WHERE script_name = :name"
                        " AND status NOT IN ('succeeded', 'failed', 'error', 'cancelled')"
                        " ORDER BY created_at DESC LIMIT 1"
                    ),
                    {"name": script_name},
                ).scalar()
            if found:
                return found
            assert time.monotonic() < deadline, "the execution was never made"
            time.sleep(0.2)
    finally:
        engine.dispose()


def _wait_for_line(env: dict[str, str], cwd: Path, execution_id: str, line: str) -> None:
    deadline = time.monotonic() + 60
    while line not in run_cli("logs", execution_id, "--no-follow", env=env, cwd=cwd).stdout:
        assert time.monotonic() < deadline, f"never printed {line!r}"
        time.sleep(0.2)


def _assert_every_line_once(stdout: str) -> None:
    assert len(re.findall(r"^started [0-9a-f]{32}$", stdout, re.M)) == 1, stdout
    ticks = re.findall(r"^tick (\d+)$", stdout, re.M)
    assert ticks == [str(i) for i in range(TICKS)], stdout


def _status(env: dict[str, str], cwd: Path, execution_id: str) -> dict:
    return json.loads(run_cli("status", execution_id, "--json", env=env, cwd=cwd).stdout)


def test_a_killed_pool_process_runs_the_script_once(stack_env, tmp_path):
    (tmp_path / "once_child.py").write_text(ONCE)
    # Followed by the CLI, as a user runs it: what it prints is what the user sees.
    cli = start_cli("run", "once_child.py", env=stack_env, cwd=tmp_path)
    try:
        execution_id = _newest_running(stack_env, "once_child.py")
        _wait_for_line(stack_env, tmp_path, execution_id, "tick 3")
        # The pool process running it, as the worker's process tree shows it.
        runner = int(_row(stack_env, execution_id)["worker"].rpartition(":")[2])
        (celery,) = _children(int(stack_env["STACK_WORKER_PID"]))
        assert runner in _children(celery), "the step is not in a pool process of the worker"
        os.kill(runner, signal.SIGKILL)
        stdout, stderr = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, stderr
    _assert_every_line_once(stdout)
    assert "succeeded" in stderr.splitlines()[-1]
    assert "following its sandbox" in stderr
    # The stored log: the same lines, once each.
    stored = run_cli("logs", execution_id, "--no-follow", env=stack_env, cwd=tmp_path)
    _assert_every_line_once(stored.stdout)
    assert _status(stack_env, tmp_path, execution_id)["status"] == "succeeded"
    client = docker.from_env()
    assert not client.api.containers(all=True, filters={"name": RUN_NAME_PREFIX + execution_id})


def test_a_killed_worker_runs_the_script_once(stack_env, tmp_path):
    """The whole worker SIGKILLed: its supervisor starts it again, the lease sweep sends the
    run step back to the host (``run_resends``), and it re-attaches."""
    (tmp_path / "once_worker.py").write_text(ONCE)
    result = run_cli("run", "once_worker.py", "--detach", env=stack_env, cwd=tmp_path)
    execution_id = result.stdout.strip()
    _wait_for_line(stack_env, tmp_path, execution_id, "tick 3")
    (celery,) = _children(int(stack_env["STACK_WORKER_PID"]))
    for pid in [*_children(celery), celery]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while (row := _status(stack_env, tmp_path, execution_id))["status"] == "running":
        assert time.monotonic() - killed < 90, "the execution was stranded"
        time.sleep(0.5)
    took = time.monotonic() - killed
    assert row["status"] == "succeeded", row["error"]
    assert _row(stack_env, execution_id)["run_resends"] == 1
    log = run_cli("logs", execution_id, "--no-follow", env=stack_env, cwd=tmp_path)
    _assert_every_line_once(log.stdout)
    assert "following its sandbox" in log.stderr
    client = docker.from_env()
    assert not client.api.containers(all=True, filters={"name": RUN_NAME_PREFIX + execution_id})
    # The supervised worker takes the next run as usual.
    (tmp_path / "ok.py").write_text("print('back')\n")
    after, result = run_json("run", "ok.py", env=stack_env, cwd=tmp_path)
    assert after["status"] == "succeeded", result.stderr
    print(f"worker killed: execution terminal {took:.1f}s after the kill, script ran once")
