"""A running stack for end-to-end tests: the API under gunicorn, a Celery worker and beat, as
real processes on the test database, Redis database and bucket; the CLI is run as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig, create_account_key
from tests.conftest import retire_sandboxes

RGRID = str(Path(sys.executable).parent / "rgrid")


# Stopped when the e2e tests are done, not at the end of the session: its beat reaps
# containers and ends executions in the shared test database, which the integration tests
# must see only their own code do.
@pytest.fixture(scope="package")
def stack_env(server_settings, tmp_path_factory) -> Iterator[dict[str, str]]:
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
        "RGRID_ALLOWED_INDEXES": "127.0.0.1",
    }
    port = free_port()
    # Supervised, as `make up` runs it: a test kills the worker, and it comes back.
    config = StackConfig(
        env=env,
        log_dir=tmp_path_factory.mktemp("stack-logs"),
        name=f"e2e-{port}",
        api_port=port,
        roles=("api", "worker", "beat"),
    )
    try:
        with Stack(config) as stack:
            yield {
                **env,
                "RGRID_API_URL": config.api_url,
                "RGRID_API_KEY": create_account_key(env, f"e2e-{port}"),
                "STACK_LOGS": str(config.log_dir),
                "STACK_WORKER_PID": str(stack.processes["worker"].pid),
            }
    finally:
        retire_sandboxes(data_dir)


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: int = 180, stdin: str | None = None
):
    """The CLI as a process; its stdin is ``stdin`` piped in, or /dev/null."""
    return subprocess.run(
        [RGRID, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def start_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """The CLI as a running process, as a user leaves it running in a terminal to stop or kill
    it later: stdin /dev/null, its output piped back as text."""
    return subprocess.Popen(
        [RGRID, *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
