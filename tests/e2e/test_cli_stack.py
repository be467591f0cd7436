"""The CLI against a running API, worker and beat."""

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import requests

from rgrid.core.cache_keys import DEADLINE_LABEL, EXECUTION_LABEL, MANAGED_LABEL
from rgrid.host.sandbox import RUN_NAME_PREFIX
from tests.e2e.conftest import RGRID, assert_one_line_error, run_cli, run_json
from tests.wheels import make_wheel

JSON_FIELDS = {
    "execution_id",
    "status",
    "exit_code",
    "duration_s",
    "script_hash",
    "script_cache_hit",
    "dependency_cache_hit",
    "input_cache_hit",
    "bytes_uploaded",
    "outputs_dir",
}


def test_run_repeat_edit_revert(stack_env, tmp_path):
    script = tmp_path / "job.py"
    original = "print('v1')\nopen('outputs/out.txt', 'w').write('v1')\n"
    script.write_text(original)

    first, result = run_json("run", "job.py", env=stack_env, cwd=tmp_path)
    assert first.keys() >= JSON_FIELDS
    assert result.returncode == 0 and first["status"] == "succeeded"
    assert first["script_cache_hit"] is False
    assert "v1" in result.stderr  # with --json, the script's output streams to stderr
    assert (tmp_path / first["outputs_dir"] / "out.txt").read_text() == "v1"
    assert first["outputs_dir"] == str(tmp_path / "rgrid-outputs" / first["execution_id"])

    second, _ = run_json("run", "job.py", env=stack_env, cwd=tmp_path)
    assert second["script_cache_hit"] is True and second["deps_build_s"] is None
    assert second["script_hash"] == first["script_hash"]

    script.write_text(original + "print('edited')\n")
    edited, result = run_json("run", "job.py", env=stack_env, cwd=tmp_path)
    assert edited["script_cache_hit"] is False and "edited" in result.stderr
    assert edited["deps_build_s"] is None and "install" not in result.stderr

    script.write_text(original)
    reverted, _ = run_json("run", "job.py", env=stack_env, cwd=tmp_path)
    assert reverted["script_cache_hit"] is True
    assert reverted["script_hash"] == first["script_hash"]
    assert reverted["runtime_image"] == first["runtime_image"]


def test_human_output_streams_and_summarises(stack_env, tmp_path):
    (tmp_path / "hello.py").write_text(
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n"
    )
    result = run_cli("run", "hello.py", env=stack_env, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == "to stdout\n"
    assert "to stderr" in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("succeeded")]
    assert len(summary) == 1 and "exit 0" in summary[0] and "script cache" in summary[0]


def test_failed_script_exit_code_and_status_logs_outputs_list(stack_env, tmp_path):
    (tmp_path / "fail.py").write_text(
        "import sys\nprint('before failing')\n"
        "open('outputs/kept.txt','w').write('k')\nsys.exit(3)\n"
    )
    execution, result = run_json("run", "fail.py", env=stack_env, cwd=tmp_path)
    assert result.returncode == 3
    assert execution["status"] == "failed" and execution["exit_code"] == 3
    execution_id = execution["execution_id"]

    status = json.loads(
        run_cli("status", execution_id, "--json", env=stack_env, cwd=tmp_path).stdout
    )
    assert status["status"] == "failed" and status["exit_code"] == 3

    logs = run_cli("logs", execution_id, env=stack_env, cwd=tmp_path)
    assert logs.returncode == 0 and logs.stdout == "before failing\n"

    outputs = run_cli("outputs", execution_id, "-o", "again", env=stack_env, cwd=tmp_path)
    assert outputs.returncode == 0
    assert (tmp_path / "again" / "kept.txt").read_text() == "k"

    listed = json.loads(run_cli("list", "--json", env=stack_env, cwd=tmp_path).stdout)
    assert execution_id in [row["execution_id"] for row in listed if row["kind"] == "execution"]


def test_timeout(stack_env, tmp_path):
    (tmp_path / "slow.py").write_text("import time\nprint('tick', flush=True)\ntime.sleep(120)\n")
    execution, result = run_json("run", "slow.py", "--timeout", "3", env=stack_env, cwd=tmp_path)
    assert result.returncode == 124
    assert execution["status"] == "timed_out" and "tick" in result.stderr


def test_empty_script_succeeds(stack_env, tmp_path):
    (tmp_path / "empty.py").write_text("")
    execution, result = run_json("run", "empty.py", env=stack_env, cwd=tmp_path)
    assert result.returncode == 0 and execution["status"] == "succeeded"


def _count(env, cwd) -> int:
    return len(json.loads(run_cli("list", "--json", "--limit", "500", env=env, cwd=cwd).stdout))


def test_bad_input_is_one_line_and_stores_nothing(stack_env, tmp_path):
    before = _count(stack_env, tmp_path)
    (tmp_path / "ok.py").write_text("pass\n")
    (tmp_path / "latin1.py").write_bytes(b"print('caf\xe9')\n")
    assert_one_line_error(
        run_cli("run", "missing.py", env=stack_env, cwd=tmp_path), "script not found"
    )
    assert_one_line_error(run_cli("run", "latin1.py", env=stack_env, cwd=tmp_path), "not UTF-8")
    assert_one_line_error(
        run_cli("run", "ok.py", "--runtime", "python:2.7", env=stack_env, cwd=tmp_path),
        "unknown runtime 'python:2.7'",
    )
    assert_one_line_error(
        run_cli("status", "0000000000000000", env=stack_env, cwd=tmp_path), "no execution"
    )
    wrong_key = {**stack_env, "RGRID_API_KEY": "rgk_wrong"}
    assert_one_line_error(
        run_cli("run", "ok.py", env=wrong_key, cwd=tmp_path), "invalid or revoked"
    )
    unreachable = {**stack_env, "RGRID_API_URL": "http://127.0.0.1:9"}
    assert_one_line_error(
        run_cli("run", "ok.py", env=unreachable, cwd=tmp_path), "cannot reach the RGrid API"
    )
    assert _count(stack_env, tmp_path) == before


def test_admin_issues_and_revokes_keys(stack_env, tmp_path):
    (tmp_path / "ok.py").write_text("print('authorised')\n")
    created = run_cli(
        "admin", "create-account", "e2e-admin", "--with-key", "--json", env=stack_env, cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    env = {**stack_env, "RGRID_API_KEY": issued["api_key"]}
    ok = run_cli("run", "ok.py", env=env, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout == "authorised\n"

    listed = run_cli("admin", "list-keys", env=stack_env, cwd=tmp_path).stdout
    assert issued["api_key"] not in listed  # shown once, never again
    assert listed.splitlines()[0].split() == [
        "ID",
        "ACCOUNT",
        "PREFIX",
        "STATE",
        "CREATED",
        "(UTC)",
    ]
    revoked = run_cli("admin", "revoke-key", str(issued["key_id"]), env=stack_env, cwd=tmp_path)
    assert revoked.returncode == 0
    assert_one_line_error(run_cli("run", "ok.py", env=env, cwd=tmp_path), "invalid or revoked")
    again = run_cli("admin", "revoke-key", str(issued["key_id"]), env=stack_env, cwd=tmp_path)
    assert_one_line_error(again, "already revoked")
    assert again.returncode == 125

    duplicate = run_cli("admin", "create-account", "e2e-admin", env=stack_env, cwd=tmp_path)
    assert_one_line_error(duplicate, "already exists")


def test_beat_reaps_a_leftover_container(stack_env):
    """A worker killed mid-run leaves its container; beat's reaper removes it."""
    client = docker.from_env()
    execution_id = secrets.token_hex(8)
    container = client.containers.create(
        "rgrid-runtime:python-3.11",
        command=["sleep", "600"],
        name=f"{RUN_NAME_PREFIX}{execution_id}",
        network_mode="none",
        labels={
            MANAGED_LABEL: "1",
            EXECUTION_LABEL: execution_id,
            DEADLINE_LABEL: str(int(time.time()) - 1),
        },
    )
    container.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not client.containers.list(all=True, filters={"id": container.id}):
            break
        time.sleep(1)
    else:
        container.remove(force=True)
        raise AssertionError("beat did not reap the leftover container within 60s")


def test_cli_entry_point_is_installed():
    assert RGRID.endswith("rgrid")


def test_requirements_file_dependency_cache_and_status(stack_env, tmp_path):
    (tmp_path / "requirements.txt").write_text("# pinned\nsix==1.16.0\n")
    (tmp_path / "job.py").write_text("import six\nprint('six', six.__version__)\n")
    first, result = run_json("run", "job.py", "-r", "requirements.txt", env=stack_env, cwd=tmp_path)
    assert first["status"] == "succeeded", result.stderr
    assert first["dependency_cache_hit"] is False
    assert "six 1.16.0" in result.stderr
    # One line per phase, closed with its time; uv's own output only with -v and in the log.
    assert "│ resolving and installing 1 requirement(s) · " in result.stderr
    assert "Resolved 1 package" not in result.stderr
    logs = run_cli("logs", first["execution_id"], env=stack_env, cwd=tmp_path)
    assert "Resolved 1 package" in logs.stderr and logs.stdout == "six 1.16.0\n"

    (tmp_path / "job.py").write_text("import six\nprint('edited', six.__version__)\n")
    second, result = run_json(
        "run", "job.py", "-r", "requirements.txt", env=stack_env, cwd=tmp_path
    )
    assert second["dependency_cache_hit"] is True and second["script_cache_hit"] is False
    assert "resolving" not in result.stderr and "Resolved" not in result.stderr

    verbose = run_cli(
        "run",
        "job.py",
        "-r",
        "requirements.txt",
        "--refresh-deps",
        "-v",
        env=stack_env,
        cwd=tmp_path,
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "Resolved 1 package" in verbose.stderr

    human = run_cli("run", "job.py", "-r", "requirements.txt", env=stack_env, cwd=tmp_path)
    assert "deps hit" in human.stderr and "script cache hit" in human.stderr

    status = run_cli("status", second["execution_id"], env=stack_env, cwd=tmp_path).stdout
    assert "six==1.16.0" in status and second["dependency_hash"] in status
    as_json = json.loads(
        run_cli("status", second["execution_id"], "--json", env=stack_env, cwd=tmp_path).stdout
    )
    assert as_json["resolved_dependencies"] == ["six==1.16.0"]


def test_bad_requirements_show_the_installers_message(stack_env, tmp_path):
    (tmp_path / "bad.txt").write_text("rgrid-no-such-package-e2e\n")
    (tmp_path / "job.py").write_text("print('never runs')\n")
    result = run_cli("run", "job.py", "-r", "bad.txt", env=stack_env, cwd=tmp_path)
    assert result.returncode == 125
    assert "build_failed" in result.stderr
    # Said once, in the log as it happened; the summary does not repeat it.
    assert result.stderr.count("not found in the package registry") == 1
    execution_id = result.stderr.split("execution ", 1)[1].split()[0]
    logs = run_cli("logs", execution_id, env=stack_env, cwd=tmp_path)
    assert "not found in the package registry" in logs.stderr

    (tmp_path / "malformed.txt").write_text("six >> 1\n")
    assert_one_line_error(
        run_cli("run", "job.py", "-r", "malformed.txt", env=stack_env, cwd=tmp_path),
        "malformed.txt:1: 'six >> 1' is not a valid requirement",
    )
    (tmp_path / "inline.py").write_text("# /// script\n# dependencies = ['six']\n# ///\n")
    (tmp_path / "ok.txt").write_text("six\n")
    assert_one_line_error(
        run_cli("run", "inline.py", "-r", "ok.txt", env=stack_env, cwd=tmp_path), "one of them"
    )


def test_twenty_concurrent_runs_install_each_environment_once_across_workers(stack_env, tmp_path):
    """Single flight across the worker's two processes: 20 submissions of the same new
    requirements and script install one environment, once, and build nothing."""
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    headers = {"Authorization": f"Bearer {stack_env['RGRID_API_KEY']}"}
    body = {
        "script": f"import {dist.replace('-', '_')} as p\nprint(p.VERSION)\n",
        "script_name": "job.py",
        "requirements": f"--find-links {tmp_path}\n{dist}\n",
    }
    url = f"{stack_env['RGRID_API_URL']}/v1/executions"
    environments = Path(stack_env["RGRID_DATA_DIR"]) / "environments"
    before = set(environments.iterdir()) if environments.is_dir() else set()
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(lambda _: requests.post(url, json=body, headers=headers), range(20))
        )
    assert [r.status_code for r in responses] == [201] * 20
    ids = [r.json()["execution_id"] for r in responses]
    deadline = time.monotonic() + 240
    while True:
        rows = [requests.get(f"{url}/{i}", headers=headers).json() for i in ids]
        if all(row["status"] not in ("queued", "building", "running") for row in rows):
            break
        assert time.monotonic() < deadline, [row["status"] for row in rows]
        time.sleep(1)
    assert [row["status"] for row in rows] == ["succeeded"] * 20, [row["error"] for row in rows]
    assert sum(row["deps_build_s"] is not None for row in rows) == 1
    assert len({row["environment"] for row in rows}) == 1
    assert set(environments.iterdir()) - before == {environments / rows[0]["environment"]}
