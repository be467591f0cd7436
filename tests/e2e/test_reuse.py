"""Instant repeats through the real CLI: `rgrid run --reuse` answers a run whose every input is
unchanged from a previous succeeded run, without a sandbox, and `rgrid why` says why one ran."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import docker
import pytest

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json
from tests.wheels import make_wheel

#: Each real run writes a fresh random token: a reused answer has the original's token, a run
#: of the script has a new one.
SCRIPT = """\
import os, sys, uuid
import helper
token = uuid.uuid4().hex
print("ran", helper.WORD, sys.argv[1:], os.environ.get("GREETING", ""))
os.makedirs("outputs", exist_ok=True)
open("outputs/token.txt", "w").write(token)
"""


def _project(folder: Path) -> None:
    (folder / "job.py").write_text(SCRIPT)
    (folder / "helper.py").write_text("WORD = 'alpha'\n")
    (folder / "data.csv").write_text("a,b\n1,2\n")


def _run(env, cwd, *extra: str, reuse: bool = True) -> dict:
    # --json before the script's own arguments (everything after -- is theirs).
    result = run_cli("run", "--json", *(["--reuse"] if reuse else []), *extra, env=env, cwd=cwd)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    return json.loads(lines[0])


def _token(cwd: Path, execution: dict) -> str:
    return (cwd / execution["outputs_dir"] / "token.txt").read_text()


def _container_events(since: float, execution_id: str) -> list[dict]:
    """Docker events (create, start, rename: a claim of a warm sandbox) naming the
    execution since ``since``: a sandbox started or claimed for it leaves one."""
    client = docker.from_env()
    events = client.events(
        since=int(since) - 1, until=int(time.time()) + 1, decode=True, filters={"type": "container"}
    )
    return [
        event
        for event in events
        if execution_id in str(event.get("Actor", {}).get("Attributes", {}).get("name", ""))
    ]


def _answered_without_a_sandbox(env, cwd: Path) -> None:
    first = _run(env, cwd, "job.py", "helper.py", "data.csv", "--", "x")
    assert first["status"] == "succeeded" and first["reused_from"] is None
    before = time.time()
    second = _run(env, cwd, "job.py", "helper.py", "data.csv", "--", "x")
    assert second["status"] == "succeeded"
    assert second["reused_from"] == first["execution_id"]
    assert second["output_cache_hit"] is True
    # The script did not run: the output is the first run's, token and all.
    assert _token(cwd, second) == _token(cwd, first)
    assert second["sandbox_warm"] is None and second["host"] is None
    assert _container_events(before, second["execution_id"]) == []
    # Its log is the original's output, replayed, and said to be reused.
    logs = run_cli("logs", second["execution_id"], env=env, cwd=cwd)
    assert logs.stdout == "ran alpha ['helper.py', 'data.csv', 'x'] \n"
    assert f"reused {first['execution_id']}" in logs.stderr
    again = ("run", "--reuse", "job.py", "helper.py", "data.csv", "--", "x")
    plain = run_cli(*again, env=env, cwd=cwd)
    assert plain.returncode == 0
    assert f"succeeded · exit 0 · reused {first['execution_id'][:8]}… · 0.0s run" in plain.stderr
    # Without --reuse it runs again.
    third = _run(env, cwd, "job.py", "helper.py", "data.csv", "--", "x", reuse=False)
    assert third["reused_from"] is None and _token(cwd, third) != _token(cwd, first)
    why = run_json("why", second["execution_id"], env=env, cwd=cwd)[0]
    assert why["reused_from"] == first["execution_id"]


def test_embedded_repeat_is_answered_without_a_sandbox(embedded_env, tmp_path):
    _project(tmp_path)
    _answered_without_a_sandbox(embedded_env, tmp_path)


def test_stack_repeat_is_answered_without_a_sandbox(stack_env, tmp_path):
    _project(tmp_path)
    _answered_without_a_sandbox(stack_env, tmp_path)


def _why(env, cwd, execution: dict) -> list[str]:
    return run_json("why", execution["execution_id"], env=env, cwd=cwd)[0]["differences"]


def test_a_change_to_any_part_of_the_key_is_a_miss(embedded_env, tmp_path):
    env, cwd = embedded_env, tmp_path
    _project(cwd)
    inputs = ("job.py", "helper.py", "data.csv")
    base = _run(env, cwd, *inputs, "-e", "GREETING=hi", "--", "x")
    assert _run(env, cwd, *inputs, "-e", "GREETING=hi", "--", "x")["reused_from"]

    (cwd / "data.csv").write_text("a,b\n1,3\n")  # one byte
    changed = _run(env, cwd, *inputs, "-e", "GREETING=hi", "--", "x")
    assert changed["reused_from"] is None and changed["output_cache_hit"] is False
    assert _why(env, cwd, changed) == ["input data.csv changed"]

    argument = _run(env, cwd, *inputs, "-e", "GREETING=hi", "--", "y")
    assert argument["reused_from"] is None
    assert _why(env, cwd, argument) == ["argument 3 differs"]

    (cwd / "helper.py").write_text("WORD = 'beta'\n")  # a shipped module
    module = _run(env, cwd, *inputs, "-e", "GREETING=hi", "--", "y")
    assert module["reused_from"] is None
    assert _why(env, cwd, module) == ["input helper.py changed"]

    value = _run(env, cwd, *inputs, "-e", "GREETING=hello", "--", "y")
    assert value["reused_from"] is None
    assert _why(env, cwd, value) == ["--env GREETING has another value"]
    # The value itself is kept nowhere the user can read back.
    assert "hello" not in run_cli("why", "--json", value["execution_id"], env=env, cwd=cwd).stdout

    (cwd / "job.py").write_text(SCRIPT + "# edited\n")
    source = _run(env, cwd, *inputs, "-e", "GREETING=hello", "--", "y")
    assert source["reused_from"] is None
    assert _why(env, cwd, source) == ["the script job.py changed"]
    assert base["execution_id"] not in (source["execution_id"], value["execution_id"])


def test_requirements_and_their_resolution_are_part_of_the_key(embedded_env, tmp_path):
    env, cwd = embedded_env, tmp_path
    wheels = cwd / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "reuse-dep", "1.0")
    (cwd / "dep.py").write_text(
        "import os, uuid, reuse_dep\nprint(reuse_dep.VERSION)\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/token.txt', 'w').write(uuid.uuid4().hex)\n"
    )
    (cwd / "req.txt").write_text(f"--find-links {wheels}\nreuse-dep\n")
    first = _run(env, cwd, "dep.py", "-r", "req.txt")
    assert _run(env, cwd, "dep.py", "-r", "req.txt")["reused_from"] == first["execution_id"]

    make_wheel(wheels, "reuse-dep", "1.1")
    refreshed = _run(env, cwd, "dep.py", "-r", "req.txt", "--refresh-deps")
    assert refreshed["reused_from"] is None
    assert _why(env, cwd, refreshed) == [
        "requirements resolved to reuse-dep==1.1 instead of reuse-dep==1.0"
    ]
    # The new resolution is what the next --reuse is answered with.
    again = _run(env, cwd, "dep.py", "-r", "req.txt")
    assert again["reused_from"] == refreshed["execution_id"]

    (cwd / "req.txt").write_text(f"--find-links {wheels}\nreuse-dep==1.0\n")
    pinned = _run(env, cwd, "dep.py", "-r", "req.txt")
    assert pinned["reused_from"] is None
    assert _why(env, cwd, pinned) == ["the requirements changed"]


def test_failed_and_timed_out_runs_are_never_reused(embedded_env, tmp_path):
    env, cwd = embedded_env, tmp_path
    (cwd / "fail.py").write_text("import uuid\nprint(uuid.uuid4().hex)\nraise SystemExit(3)\n")
    first = run_cli("run", "--reuse", "fail.py", env=env, cwd=cwd)
    second = run_cli("run", "--reuse", "fail.py", env=env, cwd=cwd)
    assert first.returncode == second.returncode == 3
    assert first.stdout != second.stdout  # it ran again
    assert "reused" not in second.stderr

    (cwd / "slow.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    for _ in range(2):
        slow, _process = run_json("run", "--reuse", "--timeout", "1", "slow.py", env=env, cwd=cwd)
        assert slow["status"] == "timed_out" and slow["reused_from"] is None
    why = run_json("why", slow["execution_id"], env=env, cwd=cwd)[0]
    assert any("only succeeded runs are reused" in line for line in why["reasons"])


def test_a_lost_output_blob_turns_the_hit_into_a_run(embedded_env, tmp_path):
    env, cwd = embedded_env, tmp_path
    _project(cwd)
    first = _run(env, cwd, "job.py", "helper.py", "data.csv")
    token = _token(cwd, first)
    # The output's stored bytes are gone (a store that lost an object).
    data = Path(env["RGRID_DATA_DIR"])
    with contextlib.closing(sqlite3.connect(data / "rgrid.db")) as db:
        (key,) = db.execute(
            "SELECT object_key FROM blobs WHERE digest = ?", (first["outputs"][0]["sha256"],)
        ).fetchone()
    (data / "store" / key).unlink()
    second = _run(env, cwd, "job.py", "helper.py", "data.csv")
    assert second["status"] == "succeeded" and second["reused_from"] is None
    assert second["output_cache_hit"] is False
    assert _token(cwd, second) != token
    # The run that replaced the dropped entry answers the next one.
    third = _run(env, cwd, "job.py", "helper.py", "data.csv")
    assert third["reused_from"] == second["execution_id"]


def test_purge_drops_the_entries(embedded_env, tmp_path):
    env, cwd = embedded_env, tmp_path
    _project(cwd)
    first = _run(env, cwd, "job.py", "helper.py", "data.csv")
    stats = run_json("cache", "stats", env=env, cwd=cwd)[0]
    assert stats["caches"]["outputs"]["entries"] == 1
    purged = run_json("cache", "purge", "--all", env=env, cwd=cwd)[0]
    assert purged["removed"]["output_cache"] == 1
    second = _run(env, cwd, "job.py", "helper.py", "data.csv")
    assert second["reused_from"] is None and _token(cwd, second) != _token(cwd, first)
    stats = run_json("cache", "stats", env=env, cwd=cwd)[0]
    assert stats["hit_rates"]["1d"]["outputs"] == {"hits": 0, "lookups": 2, "hit_rate": 0.0}


def test_a_run_with_forwarded_stdin_is_never_reused(embedded_env, tmp_path):
    env, cwd = {**embedded_env, "RGRID_AGENT": "0"}, tmp_path
    (cwd / "echo.py").write_text("import sys, uuid\nprint(sys.stdin.read(), uuid.uuid4().hex)\n")
    first = run_cli("run", "--reuse", "echo.py", env=env, cwd=cwd, stdin="same\n")
    second = run_cli("run", "--reuse", "echo.py", env=env, cwd=cwd, stdin="same\n")
    assert first.returncode == second.returncode == 0
    assert first.stdout != second.stdout and "reused" not in second.stderr


def test_why_of_an_unknown_execution_is_one_line(embedded_env, tmp_path):
    result = run_cli("why", "ffffffffffffffff", env=embedded_env, cwd=tmp_path)
    assert_one_line_error(result, "no execution ffffffffffffffff")


@pytest.fixture
def second_account(stack_env) -> dict[str, str]:
    from scripts.launcher import create_account_key

    name = f"reuse-other-{time.time_ns()}"
    return {**stack_env, "RGRID_API_KEY": create_account_key(stack_env, name)}


def test_another_accounts_identical_run_is_a_miss(stack_env, second_account, tmp_path):
    _project(tmp_path)
    mine = _run(stack_env, tmp_path, "job.py", "helper.py", "data.csv", "--", "shared")
    assert (
        _run(stack_env, tmp_path, "job.py", "helper.py", "data.csv", "--", "shared")["reused_from"]
        == mine["execution_id"]
    )
    theirs = _run(second_account, tmp_path, "job.py", "helper.py", "data.csv", "--", "shared")
    assert theirs["status"] == "succeeded" and theirs["reused_from"] is None
    assert theirs["output_cache_hit"] is False
    assert _token(tmp_path, theirs) != _token(tmp_path, mine)


#: One execution per input; its output holds a fresh token, so a reused answer has the first
#: run's token and a run of the script a new one.
BATCH_SCRIPT = """\
import os, sys, uuid
text = open(sys.argv[1]).read()
os.makedirs("outputs", exist_ok=True)
open("outputs/out.txt", "w").write(text.upper() + " " + uuid.uuid4().hex)
"""


def _batch(env, cwd, *extra: str) -> tuple[list[dict], dict]:
    result = run_cli(
        "run", "up.py", "--batch", "data", "--json", *extra, env=env, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr
    *executions, summary = [json.loads(line) for line in result.stdout.splitlines() if line]
    assert summary["summary"] is True
    return executions, summary


def _batch_outputs(cwd: Path, summary: dict) -> dict[str, str]:
    root = cwd / "rgrid-outputs" / summary["batch_id"]
    return {folder.name: (folder / "out.txt").read_text() for folder in sorted(root.iterdir())}


def _batch_reuses_the_unchanged_inputs(env, cwd: Path, count: int = 6) -> None:
    (cwd / "up.py").write_text(BATCH_SCRIPT)
    (cwd / "data").mkdir()
    for number in range(count):
        (cwd / "data" / f"in{number}.txt").write_text(f"item {number}")
    first, first_summary = _batch(env, cwd, "--reuse")
    assert first_summary["counts"] == {"succeeded": count}
    assert first_summary["reused"] == 0 and first_summary["ran"] == count
    before_outputs = _batch_outputs(cwd, first_summary)

    (cwd / "data" / "in3.txt").write_text("item three, changed")
    before = time.time()
    second, summary = _batch(env, cwd, "--reuse")
    assert summary["counts"] == {"succeeded": count}
    assert summary["reused"] == count - 1 and summary["ran"] == 1
    by_input = {e["batch_item"]: e for e in second}
    ran = [name for name, e in by_input.items() if e["reused_from"] is None]
    assert ran == ["data/in3.txt"]
    originals = {e["batch_item"]: e["execution_id"] for e in first}
    for name, execution in by_input.items():
        if name == "data/in3.txt":
            assert execution["output_cache_hit"] is False and execution["host"] is not None
            continue
        assert execution["reused_from"] == originals[name]
        assert execution["output_cache_hit"] is True and execution["sandbox_warm"] is None
        # No sandbox was started or claimed for it.
        assert _container_events(before, execution["execution_id"]) == []
    assert _container_events(before, by_input["data/in3.txt"]["execution_id"]) != []
    # Only the changed input's script ran: every other output is the first run's, token and all.
    after_outputs = _batch_outputs(cwd, summary)
    assert after_outputs.keys() == before_outputs.keys()
    changed = [name for name in after_outputs if after_outputs[name] != before_outputs[name]]
    assert changed == ["in3.txt"]
    assert after_outputs["in3.txt"].startswith("ITEM THREE, CHANGED ")
    # `rgrid why` compares a batch's execution with the last one made for the same input.
    why = run_json("why", by_input["data/in3.txt"]["execution_id"], env=env, cwd=cwd)[0]
    assert why["compared_with"] == originals["data/in3.txt"]
    assert why["differences"] == ["input data/in3.txt changed"]

    # The summary counts them apart; `batch status` too.
    plain = run_cli("run", "up.py", "--batch", "data", "--reuse", env=env, cwd=cwd, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert f"{count} reused · 0 ran" in plain.stderr, plain.stderr
    assert f"{count} answered from earlier runs (--reuse)" in plain.stderr
    status = json.loads(
        run_cli("batch", "status", summary["batch_id"], "--json", env=env, cwd=cwd).stdout
    )
    assert status["reused"] == count - 1 and status["done"]

    # Without --reuse every input runs again.
    again, again_summary = _batch(env, cwd)
    assert again_summary["reused"] == 0 and all(e["reused_from"] is None for e in again)


def test_embedded_batch_reuses_the_unchanged_inputs(embedded_env, tmp_path):
    _batch_reuses_the_unchanged_inputs(embedded_env, tmp_path)


def test_stack_batch_reuses_the_unchanged_inputs(stack_env, tmp_path):
    _batch_reuses_the_unchanged_inputs(stack_env, tmp_path)
