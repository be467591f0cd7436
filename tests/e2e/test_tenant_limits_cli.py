"""The CLI against a stack whose worker gives each execution a 64 MiB disk: a script that
writes past it ends ``failed`` with one line naming the limit, and nothing is left."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from rgrid.core.cache_keys import HOST_DIR_LABEL
from rgrid.host.sandbox import RUN_NAME_PREFIX
from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig, create_account_key
from tests.conftest import retire_sandboxes
from tests.e2e.conftest import run_cli, run_json


@pytest.fixture(scope="module")
def small_disk_stack(server_settings, tmp_path_factory) -> Iterator[dict[str, str]]:
    data_dir = tmp_path_factory.mktemp("small-disk-data")
    port = free_port()
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(data_dir),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_DISK_LIMIT": "64m",
        # A queue of its own: the package's main stack (a 4 GiB disk) must not take its work.
        "RGRID_QUEUE": f"small-disk-{port}",
    }
    config = StackConfig(
        env=env,
        log_dir=tmp_path_factory.mktemp("small-disk-logs"),
        name=f"small-disk-{port}",
        api_port=port,
        roles=("api", "worker"),
        supervised=False,
    )
    try:
        with Stack(config):
            yield {
                **env,
                "RGRID_API_URL": config.api_url,
                "RGRID_API_KEY": create_account_key(env, f"small-disk-{port}"),
                "SANDBOXES": str(data_dir / "sandboxes"),
            }
    finally:
        retire_sandboxes(data_dir)


def test_writing_past_the_disk_limit_fails_with_one_line_naming_it(small_disk_stack, tmp_path):
    (tmp_path / "fill.py").write_text(
        "print('filling', flush=True)\n"
        "with open('outputs/big.bin', 'wb') as fh:\n"
        "    while True:\n"
        "        fh.write(b'x' * 1024 * 1024)\n"
    )
    execution, result = run_json("run", "fill.py", env=small_disk_stack, cwd=tmp_path)
    assert execution["status"] == "failed"
    assert result.returncode == 1  # the script's own exit: it died of ENOSPC
    assert "disk limit 64 MiB reached" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr  # the script's, not ours
    assert not (tmp_path / "rgrid-outputs" / execution["execution_id"]).exists()

    human = run_cli("status", execution["execution_id"], env=small_disk_stack, cwd=tmp_path)
    assert "disk limit 64 MiB reached" in human.stdout
    client = docker.from_env()
    assert not client.api.containers(
        all=True, filters={"name": RUN_NAME_PREFIX + execution["execution_id"]}
    )
    # The run's folder and its filesystem go too, once the result is published (its worker
    # removes them right after, off the user's path); only warm sandboxes' remain.
    sandboxes = Path(small_disk_stack["SANDBOXES"])
    deadline = time.monotonic() + 10
    while True:
        live = {
            c["Labels"][HOST_DIR_LABEL]
            for c in client.api.containers(all=True, filters={"label": HOST_DIR_LABEL})
        }
        left = {str(p) for p in sandboxes.iterdir()} - live
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"sandbox folders without a sandbox: {left}"
