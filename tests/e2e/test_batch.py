"""`rgrid run SCRIPT --batch` against the running stack (API, a worker with two pool
processes, beat): one environment build for the whole batch, every output in its place, the
summary right; cancel, retry, bad input, a worker killed mid-batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import docker
import sqlalchemy

from rgrid.core.cache_keys import MANAGED_LABEL
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.host.sandbox import RUN_NAME_PREFIX
from tests.e2e.conftest import assert_one_line_error, run_cli, start_cli
from tests.wheels import make_wheel

SCRIPT = """\
import sys
import batch_dep
text = open(sys.argv[1]).read()
print("processing", sys.argv[1], batch_dep.VERSION)
if "bad" in text:
    sys.exit("cannot process " + sys.argv[1])
open("outputs/upper.txt", "w").write(text.upper())
"""


def _lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _batch_status(env: dict, cwd: Path, batch_id: str) -> dict:
    result = run_cli("batch", "status", batch_id, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _sandboxes_of(batch_id: str) -> list[dict]:
    return [
        c
        for c in docker.from_env().api.containers(all=True, filters={"label": MANAGED_LABEL})
        if (c.get("Names") or [""])[0].lstrip("/").startswith(RUN_NAME_PREFIX + batch_id)
    ]


def test_a_batch_of_50_builds_once_and_accounts_for_every_input(stack_env, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "batch-dep", "1.0")
    env = stack_env
    (tmp_path / "process.py").write_text(SCRIPT)
    (tmp_path / "requirements.txt").write_text(f"--find-links {wheels}\nbatch-dep\n")
    data = tmp_path / "data"
    data.mkdir()
    for number in range(50):
        text = "bad" if number in (7, 31) else f"item {number}"
        (data / f"in{number:02d}.csv").write_text(text)

    result = run_cli(
        "run",
        "process.py",
        "-r",
        "requirements.txt",
        "--batch",
        "data/*.csv",
        "--parallel",
        "6",
        "--json",
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    lines = _lines(result)
    *executions, summary = lines
    assert result.returncode == 1, result.stderr  # two inputs fail
    assert summary["summary"] is True and summary["total"] == 50
    assert summary["counts"] == {"succeeded": 48, "failed": 2}
    batch_id = summary["batch_id"]
    assert len(executions) == 50
    assert len({e["execution_id"] for e in executions}) == 50
    assert all(e["execution_id"].startswith(batch_id) for e in executions)
    # One environment build for the whole batch; every other execution found it.
    built = [e for e in executions if e["deps_build_s"] is not None]
    assert len(built) == 1, [(e["execution_id"], e["deps_build_s"]) for e in executions]
    assert sum(e["dependency_cache_hit"] is True for e in executions) >= 49 - 6
    assert len({e["environment"] for e in executions}) == 1
    failed = {e["batch_item"] for e in executions if e["status"] == "failed"}
    assert failed == {"data/in07.csv", "data/in31.csv"}
    assert {f["input"] for f in summary["failed"]} == failed
    assert all(f["last_line"].startswith("cannot process") for f in summary["failed"])
    root = tmp_path / "rgrid-outputs" / batch_id
    assert summary["outputs_dir"] == str(root)
    for number in range(50):
        out = root / f"in{number:02d}.csv" / "upper.txt"
        if number in (7, 31):
            assert not out.exists()
        else:
            assert out.read_text() == f"ITEM {number}", [
                (e["execution_id"], e["args"], e["inputs"], e["outputs"], e["input_hash"])
                for e in executions
                if e["batch_item"] in (f"data/in{number:02d}.csv", f"data/in{number - 1:02d}.csv")
            ]

    # Both of the worker's pool processes ran some of them.
    engine = sqlalchemy.create_engine(stack_env["RGRID_DATABASE_URL"])
    with engine.connect() as conn:
        workers = conn.execute(
            sqlalchemy.text("SELECT DISTINCT worker FROM executions WHERE batch_id = :b"),
            {"b": batch_id},
        ).scalars()
        assert len(set(workers)) == 2
    engine.dispose()

    status = _batch_status(env, tmp_path, batch_id[:6])
    assert status["counts"] == {"succeeded": 48, "failed": 2} and status["done"]
    # `rgrid list` shows the batch as one row, with its counts.
    listing = run_cli("list", env=env, cwd=tmp_path)
    rows = [line for line in listing.stdout.splitlines() if batch_id in line]
    assert len(rows) == 1 and "48 succeeded" in rows[0], listing.stdout
    # A batch id is the start of its executions' ids.
    one = run_cli("status", executions[0]["execution_id"], "--json", env=env, cwd=tmp_path)
    assert json.loads(one.stdout)["batch_id"] == batch_id
    many = run_cli("status", batch_id, env=env, cwd=tmp_path)
    assert_one_line_error(many, "the start of more than one execution id")

    # Retry runs only the failed ones (which fail again: their inputs are the same).
    retried = run_cli("batch", "retry", batch_id, "--json", env=env, cwd=tmp_path, timeout=300)
    *again, retry_summary = _lines(retried)
    assert {e["batch_item"] for e in again} == failed
    assert all(e["execution_id"] not in {x["execution_id"] for x in executions} for e in again)
    assert retry_summary["counts"] == {"succeeded": 48, "failed": 2}

    fetched = run_cli("batch", "outputs", batch_id, env=env, cwd=tmp_path)
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(root)


def test_cancel_mid_batch_leaves_every_row_terminal_and_no_container(stack_env, tmp_path):
    (tmp_path / "slow.py").write_text("import time, sys\nprint(sys.argv[1])\ntime.sleep(30)\n")
    for number in range(12):
        (tmp_path / f"item{number}.txt").write_text(str(number))
    (tmp_path / "list.txt").write_text(
        "\n".join(f"item{number}.txt" for number in range(12)) + "\n"
    )
    process = start_cli(
        "run",
        "slow.py",
        "--batch-file",
        "list.txt",
        "--parallel",
        "3",
        "--json",
        env=stack_env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        batch_id = None
        while (
            batch_id is None
            or _batch_status(stack_env, tmp_path, batch_id)["counts"].get("running", 0) < 2
        ):
            assert time.monotonic() < deadline, "the batch never started running"
            time.sleep(0.3)
            listing = json.loads(run_cli("list", "--json", env=stack_env, cwd=tmp_path).stdout)
            ours = [r for r in listing if "counts" in r and r["script_name"] == "slow.py"]
            batch_id = ours[0]["batch_id"] if ours else None
        process.send_signal(signal.SIGINT)  # stdin is not a terminal: cancel without asking
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["batch_id"] == batch_id
    status = _batch_status(stack_env, tmp_path, batch_id)
    assert status["done"] and status["cancelled"]
    assert set(status["counts"]) <= TERMINAL_STATUSES
    assert status["counts"].get("cancelled", 0) == 12
    deadline = time.monotonic() + 30
    while _sandboxes_of(batch_id):
        assert time.monotonic() < deadline, "a sandbox of the batch outlived its cancel"
        time.sleep(0.3)


def test_bad_batches_are_refused_with_one_line_and_nothing_submitted(stack_env, tmp_path):
    (tmp_path / "p.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "a.csv").write_text("a")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.csv").write_text("b")
    (tmp_path / "empty").mkdir()
    before = json.loads(run_cli("list", "--json", env=stack_env, cwd=tmp_path).stdout)
    cases = [
        (("--batch", "nothing/*.csv"), "matches no files"),
        (("--batch", "data/*"), "matches a folder"),
        (("--batch", "data/*.csv", "--batch", "other/*.csv"), "two batch inputs are named a.csv"),
        (("--batch", "data/*.csv", "--parallel", "0"), "--parallel"),
        (("--batch", "empty"), "has no files"),
        (("--parallel", "2"), "--parallel needs --batch"),
    ]
    for options, fragment in cases:
        result = run_cli("run", "p.py", *options, env=stack_env, cwd=tmp_path)
        assert result.returncode == 125, (options, result.stderr)
        assert_one_line_error(result, fragment)
    after = json.loads(run_cli("list", "--json", env=stack_env, cwd=tmp_path).stdout)
    assert after == before


def test_a_worker_killed_mid_batch_still_ends_every_execution(stack_env, tmp_path):
    (tmp_path / "nap.py").write_text("import time\ntime.sleep(3)\nprint('ok')\n")
    for number in range(8):
        (tmp_path / f"n{number}.txt").write_text(str(number))
    process = start_cli(
        "run",
        "nap.py",
        "--batch",
        "n*.txt",
        "--parallel",
        "2",
        "--json",
        env=stack_env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the batch never started running"
            listing = json.loads(run_cli("list", "--json", env=stack_env, cwd=tmp_path).stdout)
            ours = [r for r in listing if "counts" in r and r["script_name"] == "nap.py"]
            if ours and ours[0]["counts"].get("running"):
                break
            time.sleep(0.3)
        worker = int(stack_env["STACK_WORKER_PID"])
        found = subprocess.run(["pgrep", "-P", str(worker)], capture_output=True, text=True)
        (celery,) = [int(p) for p in found.stdout.split()]
        pool = subprocess.run(["pgrep", "-P", str(celery)], capture_output=True, text=True)
        for pid in [*(int(p) for p in pool.stdout.split()), celery]:
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    *executions, summary = [json.loads(line) for line in stdout.splitlines()]
    assert "Traceback" not in stderr
    assert summary["total"] == 8 and len(executions) == 8
    assert all(e["status"] in TERMINAL_STATUSES for e in executions)
    assert summary["counts"].get("succeeded", 0) >= 1
    lost = [e for e in executions if e["status"] == "error"]
    assert all(e["error"].startswith("worker lost") for e in lost), lost


def test_the_embedded_default_runs_a_batch_in_process(embedded_env, tmp_path):
    """No server: the executions run in this process, at most --parallel at once; the same
    outputs, summary, status, retry and list as against a stack."""
    (tmp_path / "twice.py").write_text(
        "import sys\ntext = open(sys.argv[1]).read()\n"
        "if text == 'bad':\n    sys.exit('no: ' + sys.argv[1])\n"
        "open('outputs/twice.txt', 'w').write(text * 2)\n"
    )
    for name, text in {"a.txt": "a", "b.txt": "b", "c.txt": "bad", "d.txt": "d"}.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    result = run_cli(
        "run",
        "twice.py",
        "--batch",
        "in",
        "--parallel",
        "2",
        "--json",
        env=embedded_env,
        cwd=tmp_path,
        timeout=300,
    )
    *executions, summary = _lines(result)
    assert result.returncode == 1, result.stderr
    assert summary["counts"] == {"succeeded": 3, "failed": 1}
    assert [f["last_line"] for f in summary["failed"]] == ["no: in/c.txt"]
    batch_id = summary["batch_id"]
    root = tmp_path / "rgrid-outputs" / batch_id
    assert (root / "a.txt" / "twice.txt").read_text() == "aa"
    assert (root / "d.txt" / "twice.txt").read_text() == "dd"
    assert len(executions) == 4
    status = _batch_status(embedded_env, tmp_path, batch_id)
    assert status["parallel"] == 2 and status["done"]
    listing = run_cli("list", env=embedded_env, cwd=tmp_path).stdout
    assert sum(batch_id in line for line in listing.splitlines()) == 1

    (tmp_path / "in" / "c.txt").write_text("fixed")  # the stored input is what reruns
    retried = run_cli("batch", "retry", batch_id, "--json", env=embedded_env, cwd=tmp_path)
    *again, after = _lines(retried)
    assert [e["batch_item"] for e in again] == ["in/c.txt"]
    assert after["counts"] == {"succeeded": 3, "failed": 1}
