"""Sandboxes and the warm pool on the real Docker engine: one execution per container, none
outliving its run, unclaimed ones ending themselves, and a deadline enforced inside."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import docker
import pytest

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.host import pool, sandbox, sandbox_container, sandbox_files, sandbox_fs, sandbox_run
from rgrid.host.runtimes import resolve_runtime
from tests.wheels import make_wheel

IMAGE = resolve_runtime("python:3.11").image
#: Limits no other test or installation uses, so these tests' pool key is theirs alone.
LIMITS = replace(sandbox.Limits.from_settings(Settings()), memory="257m", pids=97)


@pytest.fixture
def client():
    return docker.from_env()


@pytest.fixture
def pool_root(tmp_path, client):
    """A sandbox folder root of the test's own; whatever the test left running is ended."""
    root = tmp_path / "sandboxes"
    yield root
    for container in client.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL}):
        if Path(container["Labels"][cache_keys.HOST_DIR_LABEL]).is_relative_to(root):
            client.api.remove_container(container["Id"], force=True)
    for folder in root.iterdir() if root.is_dir() else []:
        sandbox_fs.remove_folder(folder)  # and its filesystem's mount


def _exists(client, container_id: str) -> bool:
    return bool(client.api.containers(all=True, filters={"id": container_id}))


def _gone_within(client, container_ids: list[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_exists(client, i) for i in container_ids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _orphan_folders(client, root: Path) -> list[Path]:
    """Host folders under ``root`` that no container owns any more."""
    owned = {
        c["Labels"][cache_keys.HOST_DIR_LABEL]
        for c in client.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL})
    }
    return [p for p in root.iterdir() if str(p) not in owned] if root.is_dir() else []


def _warm_ids(client, key: str) -> set[str]:
    running = client.api.containers(filters={"label": f"{cache_keys.POOL_LABEL}={key}"})
    return {c["Id"] for c in running if c["Names"][0].lstrip("/").startswith("rgrid-pool-")}


class _Events:
    """The engine's events for one container, collected in the background."""

    def __init__(self, client, container_id: str):
        self.seen: list[dict] = []
        self._stream = client.api.events(
            decode=True, filters={"container": container_id, "type": "container"}
        )
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for event in self._stream:
                self.seen.append(event)
                if event.get("status") == "destroy":
                    return
        except Exception:  # noqa: BLE001 - the stream is closed under us at the end
            return

    def actions(self) -> list[str]:
        self._thread.join(10)
        self._stream.close()
        return [e.get("status") for e in self.seen]

    def exit_code(self) -> str | None:
        for event in self.seen:
            if event.get("status") == "die":
                return event["Actor"]["Attributes"].get("exitCode")
        return None


def test_an_unclaimed_sandbox_ends_itself_after_its_idle_timeout(client, pool_root):
    settings = pool.PoolSettings(root=pool_root, idle_s=2)
    box = pool.start(client, sandbox.Environment(IMAGE), LIMITS, settings)
    events = _Events(client, box.container_id)
    started = time.monotonic()
    assert _exists(client, box.container_id)
    assert _gone_within(client, [box.container_id], 30), "the idle sandbox is still there"
    assert time.monotonic() - started >= 1.5  # it waited for a job first
    actions = events.actions()
    # It exited by itself (status 0) and the engine removed it: nobody killed it.
    assert "kill" not in actions and "destroy" in actions
    assert events.exit_code() == "0"


def test_a_sandbox_is_claimed_once_and_is_gone_after_its_run(client, pool_root):
    env = sandbox.Environment(IMAGE)
    settings = pool.PoolSettings(root=pool_root, idle_s=120)
    box = pool.start(client, env, LIMITS, settings)
    same = sandbox.Box(box.name, box.container_id, box.host_dir)
    assert sandbox_container.claim(client, box, secrets.token_hex(8))
    assert box.name.startswith(sandbox.RUN_NAME_PREFIX)
    # The pool no longer offers it, under its old name or any other.
    assert not sandbox_container.claim(client, same, secrets.token_hex(8))
    assert pool.claim(client, env, LIMITS, settings, secrets.token_hex(8)) is None

    sandbox_files.place_files(box, [("job.py", b"print('once')\n")], LIMITS)
    out: list[str] = []
    result = sandbox_run.run(
        client,
        box,
        env,
        argv=["python3", "/work/job.py"],
        timeout_s=30,
        on_output=lambda stream, text: out.append(text),
    )
    assert result.exit_code == 0 and "".join(out) == "once\n"
    # No discard(): the sandbox ends with its one script and the engine removes it.
    assert _gone_within(client, [box.container_id], 15)


DIES_AFTER_CLAIMING = """
import sys, time
from dataclasses import replace
from pathlib import Path

import docker

from rgrid.host import pool, sandbox, sandbox_container
from rgrid.core.config import Settings

root, image = sys.argv[1:3]
client = docker.from_env()
limits = replace(sandbox.Limits.from_settings(Settings()), memory="257m", pids=97)
settings = pool.PoolSettings(root=Path(root), idle_s=300)
box = pool.start(client, sandbox.Environment(image), limits, settings)
assert sandbox_container.claim(client, box, "claimed-" + box.name[-8:])
sock = client.api.attach_socket(box.container_id, params={"stdin": 1, "stream": 1})
print(box.container_id, flush=True)
time.sleep(600)
"""


def _start_runner(code: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A runner process (``code``) that prints the id of the sandbox it claimed first."""
    runner = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    container_id = runner.stdout.readline().strip()
    assert container_id, runner.stderr.read()
    return runner, container_id


def test_a_claimed_sandbox_whose_runner_dies_before_sending_the_job_ends(client, pool_root):
    """The runner claims a sandbox, attaches, and is killed before it sends the job: its
    connection closes, the supervisor sees the end of its input and exits, long before its
    300 s idle timeout."""
    runner, container_id = _start_runner(DIES_AFTER_CLAIMING, str(pool_root), IMAGE)
    try:
        time.sleep(0.5)
        assert _exists(client, container_id)  # attached and waiting, not ended by the attach
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        assert _gone_within(client, [container_id], 20)
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.stdout.close()
        runner.stderr.close()


def test_fill_keeps_the_pool_at_size_and_retire_all_ends_them(client, pool_root):
    env = sandbox.Environment(IMAGE)
    settings = pool.PoolSettings(root=pool_root, size=2, max_total=50, idle_s=120)
    key = pool.pool_key(env, LIMITS, settings)
    assert pool.fill(client, env, LIMITS, settings) == 2
    assert pool.fill(client, env, LIMITS, settings) == 0
    warm = _warm_ids(client, key)
    assert len(warm) == 2
    claimed = pool.claim(client, env, LIMITS, settings, secrets.token_hex(8))
    assert claimed is not None and claimed.container_id in warm
    assert _warm_ids(client, key) == warm - {claimed.container_id}
    assert pool.fill(client, env, LIMITS, settings) == 1
    sandbox_container.discard(client, claimed)
    assert pool.retire_all(client, env, LIMITS, settings) == 2
    assert _warm_ids(client, key) == set()
    assert _gone_within(client, [claimed.container_id, *warm], 15)


KILLED_RUNNER = """
import sys
from dataclasses import replace
from pathlib import Path

import docker

from rgrid.host import sandbox, sandbox_container, sandbox_files, sandbox_run
from rgrid.core.config import Settings

root, name, image = sys.argv[1:4]
client = docker.from_env()
env = sandbox.Environment(image)
limits = replace(sandbox.Limits.from_settings(Settings()), memory="257m", pids=97)
box = sandbox_container.start_box(client, env, limits, root=Path(root), idle_s=60, name=name)
print(box.container_id, flush=True)
assert sandbox_container.claim(client, box, name)
sandbox_files.place_files(
    box, [("job.py", b"import time\\nprint('sleeping', flush=True)\\ntime.sleep(60)\\n")], limits
)
sandbox_run.run(
    client,
    box,
    env,
    argv=["python3", "/work/job.py"],
    timeout_s=3,
    on_output=lambda stream, text: print(text, end="", flush=True),
)
"""


def test_the_deadline_holds_when_the_runner_is_killed(client, pool_root):
    """SIGKILL the process running a script with a 3 s timeout: nothing outside the sandbox
    is left to enforce it (the runner's own watchdog died with it), yet the sandbox stops on
    time and removes itself."""
    name = f"rgrid-test-{secrets.token_hex(6)}"
    runner, container_id = _start_runner(KILLED_RUNNER, str(pool_root), name, IMAGE)
    try:
        assert runner.stdout.readline() == "sleeping\n"  # the script is running
        sent_job = time.monotonic()
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        assert _exists(client, container_id)  # the runner's death did not end it
        assert _gone_within(client, [container_id], 3 + 10), "the deadline was not enforced"
        assert time.monotonic() - sent_job >= 1.5  # ended by the deadline, not by the kill
        status = json.loads((pool_root / name / "fs" / "meta" / sandbox.STATUS_FILE).read_text())
        assert status["timed_out"] is True and status["exit_code"] == 137
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.stdout.close()
        runner.stderr.close()


def test_pipeline_never_gives_a_warm_sandbox_to_a_second_execution(ctx, run_script, tmp_path):
    """Each run reports the container it ran in (its hostname is the container id): the
    second run gets a warm one the first run's refill started, never the first's own, and
    every claimed container is gone after its run."""
    from rgrid.core import cache_keys
    from rgrid.store.logbuffer import decode_log

    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"  # an environment, so a pool, of its own
    script = f"import socket, {dist.replace('-', '_')}\nprint(socket.gethostname())\n"

    def hostname(execution: dict) -> str:
        log = ctx.store.get_bytes(cache_keys.log_object_key(execution["execution_id"]))
        return "".join(t for s, t in decode_log(log) if s == "stdout").strip()

    first = run_script(script, requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    env = sandbox.Environment(IMAGE, ctx.settings.environments_dir / first["environment"])
    key = pool.pool_key(env, ctx.limits, ctx.pool)
    try:
        ran_in = [hostname(first)]
        for _ in range(2):
            ctx.join_background()
            warm = _warm_ids(ctx.docker, key)
            assert len(warm) == ctx.settings.pool_size
            again = run_script(script, requirements=requirements)
            assert again["status"] == "succeeded", again["error"]
            assert again["sandbox_warm"] is True
            host = hostname(again)
            assert any(i.startswith(host) for i in warm)  # one of the warm ones...
            assert host not in ran_in  # ...never one that ran anything before
            ran_in.append(host)
        assert len(set(ran_in)) == 3 and all(ran_in)
        assert _gone_within(ctx.docker, ran_in, 15), "a claimed sandbox outlived its run"
    finally:
        ctx.join_background()
        pool.retire_all(ctx.docker, env, ctx.limits, ctx.pool)
    assert _warm_ids(ctx.docker, key) == set()
    assert _orphan_folders(ctx.docker, ctx.settings.sandboxes_dir) == []


def test_a_sandbox_that_never_takes_its_job_is_given_up(client, pool_root):
    """A frozen supervisor never acknowledges the job: the runner gives the sandbox up after
    JOB_ACK_S (the script never started, so the pipeline may run it elsewhere), and kills it."""
    env = sandbox.Environment(IMAGE)
    box = pool.start(client, env, LIMITS, pool.PoolSettings(root=pool_root, idle_s=120))
    assert sandbox_container.claim(client, box, secrets.token_hex(8))
    sandbox_files.place_files(box, [("job.py", b"print('never')\n")], LIMITS)
    # Freeze the supervisor from the host (nothing inside the sandbox could).
    os.kill(client.api.inspect_container(box.container_id)["State"]["Pid"], signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(sandbox.SandboxUnresponsive):
        sandbox_run.run(
            client,
            box,
            env,
            argv=["python3", "/work/job.py"],
            timeout_s=60,
            on_output=lambda stream, text: None,
        )
    assert sandbox.JOB_ACK_S <= time.monotonic() - started < sandbox.JOB_ACK_S + 10
    sandbox_container.discard(client, box)
    assert _gone_within(client, [box.container_id], 15)
