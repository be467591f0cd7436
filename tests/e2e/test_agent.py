"""The embedded default's agent: the local process that keeps the pipeline loaded between
`rgrid run`s. It is started by the first run, reused by the next, replaced when the settings
differ, stopped by `rgrid agent stop` (cancelling what it runs) and ends itself when idle."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rgrid.client.agent_client import agent_sockets
from rgrid.core.config import Settings
from tests.conftest import TICKER
from tests.e2e.conftest import RGRID, run_cli, run_json, start_cli


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


def test_piped_stdin_goes_through_the_agent(embedded_env, tmp_path):
    """A run fed by a pipe (a script's subprocess, a heredoc, CI) takes the agent's path like
    one from a terminal: the agent reads the CLI's own stdin, passed over its socket."""
    (tmp_path / "echo.py").write_text(
        "import hashlib, sys\ndata = sys.stdin.buffer.read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest(), data[:11].decode().upper())\n"
    )
    first = run_cli("run", "echo.py", env=embedded_env, cwd=tmp_path, stdin="quiet words\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[2] == "QUIET"
    (agent,) = _agents(embedded_env, tmp_path)
    # Every byte, in order, with the pipe's own end as the script's EOF.
    data = "".join(f"line {i}\n" for i in range(200_000))
    second = run_cli("run", "echo.py", env=embedded_env, cwd=tmp_path, stdin=data)
    assert second.returncode == 0, second.stderr
    size, digest, _ = second.stdout.split(maxsplit=2)
    assert int(size) == len(data.encode())
    assert digest == hashlib.sha256(data.encode()).hexdigest()
    # `rgrid run echo.py < file`: a regular file as stdin, read to its end.
    (tmp_path / "in.txt").write_text("from a file\n")
    with open(tmp_path / "in.txt") as stdin:
        from_file = subprocess.run(
            [RGRID, "run", "echo.py"],
            env=embedded_env,
            cwd=tmp_path,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.split()[0] == "12" and from_file.stdout.split()[2] == "FROM"
    assert _agents(embedded_env, tmp_path) == [agent]
    # With the agent turned off, the CLI's own process forwards it.
    alone = {**embedded_env, "RGRID_AGENT": "0"}
    in_process = run_cli("run", "echo.py", env=alone, cwd=tmp_path, stdin="in process\n")
    assert in_process.returncode == 0, in_process.stderr
    assert in_process.stdout.split()[:1] == ["11"]


def _agent_fds(agent: dict) -> list[str]:
    """What the agent's open descriptors point at."""
    folder = Path(f"/proc/{agent['pid']}/fd")
    targets = []
    for fd in folder.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return targets


def _reader_released(write_end: int, timeout_s: float = 30.0) -> bool:
    """Whether every reader of a pipe is gone (writing to it fails) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.write(write_end, b"more\n")
        except BrokenPipeError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_stopping_a_run_that_reads_a_pipe_cancels_it_and_lets_the_pipe_go(
    embedded_env, tmp_path, stop
):
    """Ctrl-C (or killing the CLI) while the script waits on a pipe that never ends: the run
    is cancelled and the agent keeps no copy of the pipe (its writer sees EPIPE, as when the
    reader of a shell pipe exits)."""
    (tmp_path / "reader.py").write_text(
        "import sys\nprint('reading', flush=True)\nsys.stdin.read()\nprint('never')\n"
    )
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [RGRID, "run", "reader.py"],
            env=embedded_env,
            cwd=tmp_path,
            stdin=read_end,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(read_end)
        os.write(write_end, b"some input\n")
        assert process.stdout is not None
        assert process.stdout.readline() == "reading\n"
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
        assert "never" not in out
        assert "Traceback" not in err
        if stop == signal.SIGINT:
            assert process.returncode == 130, err
            assert "cancelled" in err.splitlines()[-1]
        else:
            assert process.returncode == -signal.SIGKILL
        assert _reader_released(write_end)
    finally:
        os.close(write_end)
    listing = run_cli("list", "--json", env=embedded_env, cwd=tmp_path)
    (reader,) = json.loads(listing.stdout)
    assert reader["status"] == "cancelled"


def test_interactive_input_from_a_terminal_goes_through_the_agent(embedded_env, tmp_path):
    """`rgrid run -i` at a terminal: the agent reads the terminal for the script, and lets
    it go when the script ends (it would otherwise take the shell's next line)."""
    (tmp_path / "typed.py").write_text(
        "import sys\nprint('ready', flush=True)\nprint('typed', sys.stdin.readline().strip())\n"
    )
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [RGRID, "run", "-i", "typed.py"],
            env=embedded_env,
            cwd=tmp_path,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        os.write(controller, b"hello there\n")
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out == "typed hello there\n"
        (agent,) = _agents(embedded_env, tmp_path)
        assert os.ttyname(terminal) not in _agent_fds(agent)
    finally:
        os.close(controller)
        os.close(terminal)


def test_agent_stop_cancels_what_it_runs(embedded_env, tmp_path):
    (tmp_path / "ticker.py").write_text(TICKER)
    process = start_cli("run", "ticker.py", env=embedded_env, cwd=tmp_path)
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
