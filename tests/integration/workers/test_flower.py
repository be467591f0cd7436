"""Flower, as `make up` starts it: every chain step shows its execution id, beat's jobs show
their results, and Flower never answers without credentials when it has them (it must have
them anywhere but loopback)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from rgrid.core import queueing
from scripts.commands import flower_command
from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig, create_account_key
from tests.conftest import retire_sandboxes
from tests.e2e.conftest import run_json


def test_flower_off_loopback_needs_credentials():
    with pytest.raises(RuntimeError, match="RGRID_FLOWER_BASIC_AUTH"):
        flower_command(5555, "0.0.0.0")
    command = flower_command(5555, "0.0.0.0", "ops:secret")
    assert "--address=0.0.0.0" in command
    assert not any("secret" in part for part in command)  # never where `ps` shows it


def _get(url: str, auth: str | None = None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def flower_stack(server_settings, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("flower-data")
    auth = f"ops:{secrets.token_hex(8)}"
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(data_dir),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_QUEUE": f"rgrid-flower-{secrets.token_hex(4)}",
        "RGRID_FLOWER_BASIC_AUTH": auth,
    }
    port = free_port()
    config = StackConfig(
        env=env,
        log_dir=tmp_path_factory.mktemp("flower-logs"),
        name=f"flower-{port}",
        api_port=port,
        flower_port=free_port(),
        roles=("api", "worker", "flower"),
        supervised=False,
    )
    try:
        with Stack(config):
            key = create_account_key(env, f"flower-{port}")
            yield config, {**env, "RGRID_API_URL": config.api_url, "RGRID_API_KEY": key}, auth
    finally:
        retire_sandboxes(data_dir)


def _tasks(flower_url: str, auth: str) -> dict:
    _, body = _get(f"{flower_url}/api/tasks", auth)
    return json.loads(body)


def test_every_step_shows_its_execution_id_and_flower_needs_credentials(flower_stack, tmp_path):
    config, env, auth = flower_stack
    flower = f"http://127.0.0.1:{config.flower_port}"
    deadline = time.monotonic() + 30
    while True:  # until Flower answers
        try:
            _get(f"{flower}/healthcheck")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "Flower did not start"
            time.sleep(0.3)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{flower}/api/tasks")
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        _get(f"{flower}/tasks", "ops:wrong")

    (tmp_path / "hello.py").write_text("print('hello')\n")
    done, result = run_json("run", "hello.py", env=env, cwd=tmp_path)
    assert done["status"] == "succeeded", result.stderr
    execution_id = done["execution_id"]
    deadline = time.monotonic() + 30
    while True:  # Flower learns of tasks from the worker's events
        mine = {
            task["name"]: task
            for task in _tasks(flower, auth).values()
            if execution_id in (task.get("args") or "")
        }
        finished = all(task["state"] == "SUCCESS" for task in mine.values())
        if (set(mine) == set(queueing.PIPELINE) and finished) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(mine) == set(queueing.PIPELINE), sorted(mine)
    assert all(task["state"] == "SUCCESS" for task in mine.values()), mine


def test_a_browser_shows_the_steps_of_an_execution(flower_stack, tmp_path):
    """A real browser (headless Chromium, Debian's package) renders Flower's page of the run
    step, with the execution id in its arguments; a screenshot is kept beside the test's
    files."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is missing: `make setup` installs it"
    config, env, auth = flower_stack
    (tmp_path / "shown.py").write_text("print('shown')\n")
    done, result = run_json("run", "shown.py", env=env, cwd=tmp_path)
    assert done["status"] == "succeeded", result.stderr
    flower = f"http://127.0.0.1:{config.flower_port}"
    deadline = time.monotonic() + 30
    while True:  # Flower learns of the tasks from the worker's events
        run_task = [
            uuid
            for uuid, task in _tasks(flower, auth).items()
            if task["name"] == queueing.RUN and done["execution_id"] in (task.get("args") or "")
        ]
        if run_task or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert run_task
    # The task's own page is rendered by Flower's server (the tasks list is filled by
    # JavaScript requests, which do not carry a URL's credentials).
    user, password = auth.split(":")
    page = f"http://{user}:{password}@127.0.0.1:{config.flower_port}/task/{run_task[0]}"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run(
        [*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120
    ).stdout
    assert done["execution_id"] in dom and queueing.RUN in dom and "SUCCESS" in dom
    shot = tmp_path / "flower-tasks.png"
    subprocess.run(
        [*browser, "--window-size=1400,900", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000
