"""The embedded default's agent: the local process that keeps the pipeline loaded between
`rgrid run`s. It is started by the first run, reused by the next, replaced when the settings
differ, stopped by `rgrid agent stop` (cancelling what it runs) and ends itself when idle."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from rgrid.agent_client import agent_sockets
from rgrid.config import Settings
from tests.conftest import TICKER
from tests.e2e.conftest import RGRID, run_cli, run_json


def _agents(env: dict[str, str], cwd: Path) -> list[dict]:
    result = run_cli("agent", "status", "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["agents"]


def test_the_second_run_reuses_the_agent_the_first_started(embedded_env, tmp_path):
    (tmp_path / "hello.py").write_text("print('hello')\n")
    assert _agents(embedded_env, tmp_path) == []
    first, _ = run_json("run", "hello.py", env=embedded_env, cwd=tmp_path)
    (agent,) = _agents(embedded_env, tmp_path)
    second, result = run_json("run", "hello.py", env=embedded_env, cwd=tmp_path)
    assert result.returncode == 0
    assert second["status"] == "succeeded"
    assert _agents(embedded_env, tmp_path) == [agent]
    # Other settings, another agent: a shell with another memory limit never gets the first
    # agent's.
    other = {**embedded_env, "RGRID_MEMORY_LIMIT": "768m"}
    third, _ = run_json("run", "hello.py", env=other, cwd=tmp_path)
    assert third["memory_bytes"] == 768 * 1024**2
    assert len(_agents(embedded_env, tmp_path)) == 2


def test_piped_stdin_runs_in_the_cli_itself(embedded_env, tmp_path):
    """The agent is not the script's terminal: a run that forwards stdin stays in process."""
    (tmp_path / "echo.py").write_text("import sys\nprint(sys.stdin.read().upper())\n")
    result = run_cli("run", "echo.py", env=embedded_env, cwd=tmp_path, stdin="quiet words\n")
    assert result.returncode == 0, result.stderr
    assert "QUIET WORDS" in result.stdout
    assert _agents(embedded_env, tmp_path) == []


def test_agent_stop_cancels_what_it_runs(embedded_env, tmp_path):
    (tmp_path / "ticker.py").write_text(TICKER)
    process = subprocess.Popen(
        [RGRID, "run", "ticker.py"],
        env=embedded_env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("tick")
    stop = run_cli("agent", "stop", env=embedded_env, cwd=tmp_path)
    assert stop.stdout.strip() == "stopped 1 agent(s)"
    _out, err = process.communicate(timeout=30)
    assert process.returncode != 0, err
    assert "Traceback" not in err
    listing = run_cli("list", "--json", env={**embedded_env, "RGRID_AGENT": "0"}, cwd=tmp_path)
    (ticker,) = json.loads(listing.stdout)
    assert ticker["status"] == "cancelled"
    assert _agents(embedded_env, tmp_path) == []


def test_an_idle_agent_ends_itself(embedded_env, tmp_path):
    env = {**embedded_env, "RGRID_AGENT_IDLE": "2"}
    (tmp_path / "hello.py").write_text("print('hello')\n")
    _, result = run_json("run", "hello.py", env=env, cwd=tmp_path)
    assert result.returncode == 0
    deadline = time.monotonic() + 20
    while _agents(env, tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _agents(env, tmp_path) == []
    assert not agent_sockets(Settings(data_dir=Path(env["RGRID_DATA_DIR"])))
