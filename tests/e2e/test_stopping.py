"""Stopping a run: Ctrl-C, SIGTERM, SIGHUP, a closed stdout, `rgrid cancel` from another
terminal, and a killed CLI. Each ends the execution once, clearly, and leaves no sandbox."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import docker
import pytest

from rgrid.host.sandbox import RUN_NAME_PREFIX
from tests.conftest import TICKER
from tests.e2e.conftest import RGRID, run_cli, start_cli


def _start(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    (cwd / "ticker.py").write_text(TICKER)
    return subprocess.Popen(
        [RGRID, "run", "ticker.py", *args],
        # A CLI that hangs is made to print where it is (_ended), so a rare hang says why.
        env={**env, "PYTHONFAULTHANDLER": "1"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _ended(process: subprocess.Popen, timeout_s: float = 30) -> str:
    """The stopped CLI's stderr once it has exited; if it has not within ``timeout_s``, the
    test fails with the stack of every thread of it (faulthandler, on SIGABRT)."""
    try:
        return process.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _out, err = process.communicate(timeout=10)
        pytest.fail(f"rgrid run did not end within {timeout_s} s; where it was:\n{err}")


def _wait_for_ticks(process: subprocess.Popen) -> None:
    """Until the script is running (its first line arrived)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("tick"), line


def _execution_id(stderr: str) -> str:
    match = re.search(r"execution ([0-9a-f]{16})", stderr)
    assert match, stderr
    return match.group(1)


def _status(env: dict[str, str], cwd: Path, execution_id: str) -> dict:
    result = run_cli("status", execution_id, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _sandbox_gone(execution_id: str, within_s: float = 10) -> bool:
    client = docker.from_env()
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not client.api.containers(all=True, filters={"name": RUN_NAME_PREFIX + execution_id}):
            return True
        time.sleep(0.2)
    return False


def _no_work_folders(data_dir: Path) -> bool:
    sandboxes = data_dir / "sandboxes"
    # What is left may only be warm pool sandboxes' folders, never the run's.
    return all(
        not (folder / "fs" / "work" / "ticker.py").exists()
        for folder in (sandboxes.iterdir() if sandboxes.is_dir() else [])
    )


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
)
def test_stopping_rgrid_run_cancels_the_execution(embedded_env, tmp_path, signum, exit_code):
    process = _start(embedded_env, tmp_path)
    _wait_for_ticks(process)
    started = time.monotonic()
    process.send_signal(signum)
    err = _ended(process)
    took = time.monotonic() - started
    assert process.returncode == exit_code, err
    assert "Traceback" not in err
    execution_id = _execution_id(err)
    assert err.strip().splitlines()[-1] == f"rgrid: stopped; execution {execution_id} cancelled"
    assert took < 10
    assert _status(embedded_env, tmp_path, execution_id)["status"] == "cancelled"
    assert _sandbox_gone(execution_id)
    assert _no_work_folders(Path(embedded_env["RGRID_DATA_DIR"]))


def test_a_closed_stdout_cancels_the_execution(embedded_env, tmp_path):
    """`rgrid run ticker.py | head -1`: the reader goes away, the run stops."""
    process = _start(embedded_env, tmp_path)
    _wait_for_ticks(process)
    assert process.stdout is not None
    process.stdout.close()
    assert process.stderr is not None
    err = process.stderr.read()
    process.wait(30)
    assert process.returncode == 141, err
    execution_id = _execution_id(err)
    assert _status(embedded_env, tmp_path, execution_id)["status"] == "cancelled"
    assert _sandbox_gone(execution_id)


def test_output_and_errors_closed_together_cancel_the_execution(embedded_env, tmp_path):
    """`rgrid run ticker.py 2>&1 | head -2`: RGrid's own last line has nowhere to go either,
    and the run still stops, with the same exit code."""
    (tmp_path / "ticker.py").write_text(TICKER)
    process = subprocess.Popen(
        [RGRID, "run", "ticker.py"],
        env=embedded_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    seen = [process.stdout.readline()]
    while not seen[-1].startswith("tick"):
        assert seen[-1], seen
        seen.append(process.stdout.readline())
    process.stdout.close()
    process.wait(30)
    assert process.returncode == 141, seen
    execution_id = _execution_id("".join(seen))
    assert _status(embedded_env, tmp_path, execution_id)["status"] == "cancelled"
    assert _sandbox_gone(execution_id)


def test_any_command_whose_reader_goes_away_ends_141_without_a_traceback(embedded_env, tmp_path):
    """`rgrid logs ID | head -1` (a log longer than the pipe holds)."""
    (tmp_path / "long.py").write_text("for i in range(100_000):\n    print('line', i)\n")
    ran = run_cli("run", "long.py", "--json", env=embedded_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    execution_id = json.loads(ran.stdout)["execution_id"]
    process = start_cli("logs", execution_id, env=embedded_env, cwd=tmp_path)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == "line 0\n"
    process.stdout.close()
    err = process.stderr.read()
    process.wait(30)
    assert process.returncode == 141, err
    assert "Traceback" not in err and "Error" not in err, err


def test_rgrid_cancel_from_another_terminal(embedded_env, tmp_path):
    process = _start(embedded_env, tmp_path)
    _wait_for_ticks(process)
    # The execution id is printed before the first tick.
    time.sleep(0.3)
    execution_id = None
    for execution in json.loads(run_cli("list", "--json", env=embedded_env, cwd=tmp_path).stdout):
        if execution["status"] == "running":
            execution_id = execution["execution_id"]
    assert execution_id is not None
    result = run_cli("cancel", execution_id, env=embedded_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cancelled {execution_id}"
    err = _ended(process)
    # The followed run ended cancelled, and says so in its summary line.
    assert process.returncode == 130, err
    assert "cancelled" in err.strip().splitlines()[-1]
    assert _sandbox_gone(execution_id)
    again = run_cli("cancel", execution_id, env=embedded_env, cwd=tmp_path)
    assert again.returncode == 0
    assert again.stdout.strip() == f"{execution_id} already finished (cancelled): nothing to do"


def test_a_killed_cli_cancels_its_run(embedded_env, tmp_path):
    """SIGKILL leaves the CLI no chance to clean up; the agent that runs its execution sees
    the connection close and cancels it at once."""
    process = _start(embedded_env, tmp_path)
    _wait_for_ticks(process)
    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 15
    while True:
        executions = json.loads(run_cli("list", "--json", env=embedded_env, cwd=tmp_path).stdout)
        (killed,) = [e for e in executions if e["script_name"] == "ticker.py"]
        if killed["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert killed["status"] == "cancelled"
    assert _sandbox_gone(killed["execution_id"])


def test_a_killed_in_process_cli_is_cleaned_up_by_the_next_one(embedded_env, tmp_path):
    """Without the agent (RGRID_AGENT=0) the run lives in the CLI's own process: SIGKILL
    leaves it to the next `rgrid` on this machine to end it."""
    env = {**embedded_env, "RGRID_AGENT": "0"}
    process = _start(env, tmp_path)
    _wait_for_ticks(process)
    process.kill()
    process.wait(10)
    executions = json.loads(run_cli("list", "--json", env=env, cwd=tmp_path).stdout)
    (killed,) = [e for e in executions if e["script_name"] == "ticker.py"]
    assert killed["status"] == "error"
    assert killed["error"] == "interrupted: the rgrid process running it was killed"
    assert _sandbox_gone(killed["execution_id"])
    # Its host folder and filesystem too: nothing else may ever run in this data folder.
    assert _no_work_folders(Path(env["RGRID_DATA_DIR"]))


def test_a_killed_agent_ends_its_run_clearly(embedded_env, tmp_path):
    """The agent killed mid-run: the CLI says so in one line and exits 125; the next `rgrid`
    ends the execution and its sandbox."""
    process = _start(embedded_env, tmp_path)
    _wait_for_ticks(process)
    from rgrid.client.agent_client import AgentClient, agent_sockets
    from rgrid.core.config import Settings

    sockets = agent_sockets(Settings(data_dir=Path(embedded_env["RGRID_DATA_DIR"])))
    assert sockets, "the run did not go through an agent"

    agent_pid = AgentClient.connect(sockets[0]).ping()["pid"]
    os.kill(agent_pid, signal.SIGKILL)
    err = _ended(process)
    assert process.returncode == 125, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rgrid: error: the local rgrid agent stopped")
    executions = json.loads(
        run_cli("list", "--json", env={**embedded_env, "RGRID_AGENT": "0"}, cwd=tmp_path).stdout
    )
    (killed,) = [e for e in executions if e["script_name"] == "ticker.py"]
    assert killed["status"] == "error"
    assert _sandbox_gone(killed["execution_id"])
    assert _no_work_folders(Path(embedded_env["RGRID_DATA_DIR"]))


def test_detach_returns_at_once_and_the_run_goes_on(stack_env, tmp_path):
    (tmp_path / "ticker.py").write_text(TICKER)
    result = run_cli("run", "ticker.py", "--detach", env=stack_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    execution_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", execution_id)
    deadline = time.monotonic() + 30
    while _status(stack_env, tmp_path, execution_id)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    started = time.monotonic()
    cancel = run_cli("cancel", execution_id, env=stack_env, cwd=tmp_path)
    assert cancel.stdout.strip() == f"cancelled {execution_id}"
    while _status(stack_env, tmp_path, execution_id)["status"] == "running":
        assert time.monotonic() - started < 10, "the worker did not stop it"
        time.sleep(0.1)
    assert _status(stack_env, tmp_path, execution_id)["status"] == "cancelled"
    assert _sandbox_gone(execution_id)
    # Its log was kept up to the moment it stopped.
    log = run_cli("logs", execution_id, "--no-follow", env=stack_env, cwd=tmp_path)
    assert "tick 0" in log.stdout
    assert "cancelled" in log.stderr


def test_ctrl_c_against_the_stack(stack_env, tmp_path):
    process = _start(stack_env, tmp_path)
    _wait_for_ticks(process)
    process.send_signal(signal.SIGINT)
    err = _ended(process)
    assert process.returncode == 130, err
    execution_id = _execution_id(err)
    assert err.strip().splitlines()[-1] == f"rgrid: stopped; execution {execution_id} cancelled"
    assert _sandbox_gone(execution_id)
