"""Redis SIGKILLed while a script runs, and started again empty (no persistence, as a crash
of the test's own redis-server loses everything): the run ends ``succeeded``, the stored log
holds every line once, and the CLI that followed it live printed every line once.

The stack here (API, supervised worker, beat) runs on a Redis of its own on a free port, so
killing it disturbs nothing else."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig, create_account_key
from tests.conftest import retire_sandboxes
from tests.e2e.conftest import run_cli, start_cli
from tests.integration.workers.test_broker_restart import _start_redis

TICKS = 20
#: 20 s of one tick a second.
TICKER = (
    f"import time\nfor i in range({TICKS}):\n    print('tick', i, flush=True)\n    time.sleep(1)\n"
)


def _ticks(text: str) -> list[str]:
    return re.findall(r"^tick (\d+)$", text, re.M)


def test_a_redis_crash_loses_no_log_line(tmp_path, server_settings):
    port = free_port()
    redis = _start_redis(port)
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(tmp_path / "data"),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_LEASE": "4",
        "RGRID_REAP_INTERVAL_S": "2",
    }
    api_port = free_port()
    config = StackConfig(
        env=env,
        log_dir=tmp_path / "logs",
        name=f"redis-crash-{port}",
        api_port=api_port,
        roles=("api", "worker", "beat"),
    )
    (tmp_path / "ticker.py").write_text(TICKER)
    try:
        with Stack(config):
            cli_env = {
                **env,
                "RGRID_API_URL": config.api_url,
                "RGRID_API_KEY": create_account_key(env, f"redis-crash-{port}"),
            }
            cli = start_cli("run", "ticker.py", env=cli_env, cwd=tmp_path)
            try:
                deadline = time.monotonic() + 60
                while True:
                    shown = run_cli("logs", "last", "--no-follow", env=cli_env, cwd=tmp_path)
                    if "tick 0" in shown.stdout:
                        break
                    assert time.monotonic() < deadline, shown.stderr
                    time.sleep(0.2)
                time.sleep(5)
                redis.send_signal(signal.SIGKILL)
                redis.wait(10)
                time.sleep(2)  # down for 2 s, then back empty
                redis = _start_redis(port)
                stdout, stderr = cli.communicate(timeout=180)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.communicate()
            stored = run_cli("logs", "last", "--no-follow", env=cli_env, cwd=tmp_path)
    finally:
        redis.kill()
        redis.wait(10)
        retire_sandboxes(Path(env["RGRID_DATA_DIR"]))
    assert cli.returncode == 0, stderr
    assert "succeeded" in stderr.strip().splitlines()[-1], stderr
    every = [str(i) for i in range(TICKS)]
    assert _ticks(stdout) == every, stdout  # live, through the crash
    assert _ticks(stored.stdout) == every, stored.stdout  # and as stored
