"""A running stack for end-to-end tests: the API under gunicorn, a Celery worker and beat, as
real processes on the test database, Redis database and bucket; the CLI is run as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import retire_sandboxes

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
RGRID = str(BIN / "rgrid")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Stopped when the e2e tests are done, not at the end of the session: its beat reaps
# containers and ends executions in the shared test database, which the integration tests
# must see only their own code do.
@pytest.fixture(scope="package")
def stack_env(server_settings, tmp_path_factory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("stack-logs")
    # The stack's worker host keeps its environments and sandbox folders here, not in the
    # user's own data folder.
    data_dir = tmp_path_factory.mktemp("stack-data")
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(data_dir),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_REAP_INTERVAL_S": "2",
        # A short lease, so a killed worker's execution is swept within seconds.
        "RGRID_LEASE": "4",
        "RGRID_ALLOW_LOCAL_FIND_LINKS": "1",
    }
    port = _free_port()
    commands = {
        "api": [
            str(BIN / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "4",
            "rgrid.api:create_app()",
        ],
        # Supervised, as `make up` runs it: a test kills it, and it comes back.
        "worker": [
            str(REPO / "scripts" / "supervise.sh"),
            str(BIN / "celery"),
            "-A",
            "workers.celery_app",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "--hostname",
            f"e2e-{port}@%h",
        ],
        "beat": [
            str(BIN / "celery"),
            "-A",
            "workers.celery_app",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(logs / "beat-schedule"),
        ],
    }
    processes = {
        name: subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(logs / f"{name}.log", "w"),  # noqa: SIM115 - lives as long as the process
            stderr=subprocess.STDOUT,
        )
        for name, command in commands.items()
    }
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if requests.get(f"{url}/healthz", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError((logs / "api.log").read_text())
        created = subprocess.run(
            [RGRID, "admin", "create-account", f"e2e-{port}", "--with-key", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(created.stdout)["api_key"]
        yield {
            **env,
            "RGRID_API_URL": url,
            "RGRID_API_KEY": key,
            "STACK_LOGS": str(logs),
            "STACK_WORKER_PID": str(processes["worker"].pid),
        }
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        retire_sandboxes(data_dir)


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: int = 180):
    return subprocess.run(
        [RGRID, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_json(
    *args: str, env: dict[str, str], cwd: Path
) -> tuple[dict, subprocess.CompletedProcess]:
    result = run_cli(*args, "--json", env=env, cwd=cwd)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    return json.loads(lines[0]), result


def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
