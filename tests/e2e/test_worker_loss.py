"""The whole Celery worker is SIGKILLed while a script runs (main process and pool
processes): the execution is not stranded. Its lease lapses, beat's sweep ends it
`error: worker lost` and removes its sandbox, and the supervised worker comes back for the
next run. (The stack here runs with RGRID_LEASE=4.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import docker

from rgrid.sandbox import RUN_NAME_PREFIX
from tests.conftest import TICKER
from tests.e2e.conftest import run_cli, run_json


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _status(env: dict[str, str], cwd: Path, execution_id: str) -> dict:
    return json.loads(run_cli("status", execution_id, "--json", env=env, cwd=cwd).stdout)


def test_a_killed_worker_strands_nothing(stack_env, tmp_path):
    (tmp_path / "ticker.py").write_text(TICKER)
    result = run_cli("run", "ticker.py", "--detach", env=stack_env, cwd=tmp_path)
    execution_id = result.stdout.strip()
    deadline = time.monotonic() + 60
    # Until the script is printing (its log streams while it runs).
    while (
        "tick 0"
        not in run_cli("logs", execution_id, "--no-follow", env=stack_env, cwd=tmp_path).stdout
    ):
        assert time.monotonic() < deadline, "the script never started"
        time.sleep(0.2)

    (celery,) = _children(int(stack_env["STACK_WORKER_PID"]))
    for pid in [*_children(celery), celery]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    while (row := _status(stack_env, tmp_path, execution_id))["status"] == "running":
        assert time.monotonic() - killed < 60, "the execution was stranded"
        time.sleep(0.5)
    took = time.monotonic() - killed
    assert row["status"] == "error"
    assert row["error"].startswith("worker lost: ")
    client = docker.from_env()
    name = RUN_NAME_PREFIX + execution_id
    while client.api.containers(all=True, filters={"name": name}):
        assert time.monotonic() - killed < 30, "its sandbox outlived it"
        time.sleep(0.2)
    log = run_cli("logs", execution_id, "--no-follow", env=stack_env, cwd=tmp_path)
    assert "tick 0" in log.stdout

    # The supervisor started the worker again: the next run works.
    (tmp_path / "ok.py").write_text("print('back')\n")
    after, result = run_json("run", "ok.py", env=stack_env, cwd=tmp_path)
    assert after["status"] == "succeeded", result.stderr
    print(f"worker lost: execution terminal {took:.1f}s after the kill")
