"""A Redis restart under a running worker: the worker (supervised as `make up` runs it) is
back taking work soon after, instead of gone for good.

It runs against a Redis of its own on a free port, so restarting it disturbs nothing else."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from celery import Celery

from scripts.commands import worker_command
from scripts.devenv import free_port
from scripts.launcher import spawn
from scripts.processes import stop_group

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _start_redis(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError("redis-server did not start")


def _answers(app: Celery) -> bool:
    try:
        return bool(app.control.ping(timeout=1.0))
    except Exception:  # noqa: BLE001 - Redis itself may still be down
        return False


def _seconds_until_it_answers(app: Celery, within_s: float) -> float:
    started = time.monotonic()
    while not _answers(app):
        assert time.monotonic() - started < within_s, f"no worker answered within {within_s}s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_worker_takes_work_again_after_redis_restarts(tmp_path, database_url):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = _start_redis(port)
    env = {
        **os.environ,
        "RGRID_REDIS_URL": url,
        "RGRID_DATA_DIR": str(tmp_path / "data"),
        "RGRID_POOL_SIZE": "0",
        "RGRID_DATABASE_URL": database_url,
    }
    worker = spawn(
        worker_command(f"restart-test-{port}", concurrency=1), env, tmp_path / "worker.log"
    )
    app = Celery(broker=url)
    try:
        _seconds_until_it_answers(app, 60)
        # A 0.2 s restart, as measured to kill celery 5.7's main process here.
        redis.terminate()
        redis.wait(10)
        time.sleep(0.2)
        redis = _start_redis(port)
        recovered = _seconds_until_it_answers(app, 60)
    finally:
        stop_group(worker.pid)
        redis.kill()
        app.close()
    restarted = "exited with status" in (tmp_path / "worker.log").read_text()
    # Whether it reconnected or its supervisor started it again, it answered within a minute.
    print(f"worker answered {recovered:.1f}s after the restart (restarted: {restarted})")
