"""What users of `uv run` and `docker run` expect of `rgrid run`, through the real CLI, on the
embedded default and against a running stack: arguments after `--`, piped stdin, `--env`
secrets, sibling imports, limits, live logs from a second terminal, exit codes, JSON errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import redis

from tests.e2e.conftest import RGRID, assert_one_line_error, run_cli, run_json, start_cli

SECRET = "rgrid-e2e-" + "s3cr3t-" * 3

MAIN = """\
import hashlib, os, sys
import helpers
print("args", sys.argv[1:])
print("cwd", os.getcwd())
print("helper", helpers.VALUE)
data = sys.stdin.read()
print("stdin", len(data), data.splitlines()[:2])
print("token", hashlib.sha256(os.environ.get("TOKEN", "").encode()).hexdigest())
print("mode", os.environ.get("MODE"), os.environ.get("QUOTED"))
home = os.path.expanduser("~")
open(os.path.join(home, "probe"), "w").write("writable")
print("home writable", os.access(home, os.W_OK))
"""


@pytest.fixture(params=["embedded", "stack"])
def user_env(request, tmp_path) -> dict[str, str]:
    """The same user habits, checked on both ways RGrid runs."""
    return request.getfixturevalue(f"{request.param}_env")


def test_arguments_stdin_env_and_sibling_imports_behave_as_locally(user_env, tmp_path):
    (tmp_path / "main.py").write_text(MAIN)
    (tmp_path / "helpers.py").write_text("VALUE = 42\n")
    (tmp_path / "vars.env").write_text('# settings\nexport MODE=fast\nQUOTED="a b"\n')
    env = {**user_env, "TOKEN": SECRET}
    result = run_cli(
        "run",
        "main.py",
        "helpers.py",
        "-e",
        "TOKEN",
        "--env-file",
        "vars.env",
        "--",
        "--verbose",
        "-a",
        "x y",
        env=env,
        cwd=tmp_path,
        stdin="first line\nsecond line\n" * 1000,
    )
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, err
    lines = out.splitlines()
    # Everything after `--` reaches the script unchanged, even what looks like rgrid's options.
    assert lines[0] == "args ['helpers.py', '--verbose', '-a', 'x y']"
    assert lines[1] == "cwd /work"
    assert lines[2] == "helper 42"
    assert lines[3] == "stdin 23000 ['first line', 'second line']"
    assert lines[4] == "token " + hashlib.sha256(SECRET.encode()).hexdigest()
    assert lines[5] == "mode fast a b"
    assert lines[6] == "home writable True"
    assert SECRET not in out + err
    execution_id = err.split("execution ", 1)[1].split()[0]
    status, _ = run_json("status", execution_id, env=user_env, cwd=tmp_path)
    assert status["env_names"] == ["MODE", "QUOTED", "TOKEN"]
    assert SECRET not in json.dumps(status)
    _assert_secret_stored_nowhere(user_env, tmp_path)


def _assert_secret_stored_nowhere(env: dict[str, str], cwd: Path) -> None:
    """The value passed with --env is in no database, object, log or Redis key afterwards."""
    needle = SECRET.encode()
    logs = run_cli("logs", "last", env=env, cwd=cwd)
    assert logs.returncode == 0 and SECRET not in logs.stdout + logs.stderr
    if "RGRID_API_URL" not in env:
        data_dir = Path(env["RGRID_DATA_DIR"])
        for path in data_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert needle not in path.read_bytes(), path
        return
    url = env["RGRID_DATABASE_URL"].replace("postgresql+psycopg2://", "postgresql://")
    dump = subprocess.run(["pg_dump", url], capture_output=True, check=True).stdout
    assert b"TOKEN" in dump  # the name is kept, the value never
    assert needle not in dump
    s3 = boto3.client("s3", endpoint_url=env["RGRID_S3_ENDPOINT_URL"])
    bucket = env["RGRID_S3_BUCKET"]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            assert needle not in body, item["Key"]
    client = redis.Redis.from_url(env["RGRID_REDIS_URL"])
    for key in client.scan_iter("rgrid:*"):
        read = {
            b"string": lambda k: [client.get(k)],
            b"list": lambda k: client.lrange(k, 0, -1),
            b"hash": lambda k: [*client.hkeys(k), *client.hvals(k)],
            b"set": lambda k: list(client.smembers(k)),
            b"zset": lambda k: client.zrange(k, 0, -1),
        }
        values = read.get(client.type(key), lambda k: [])(key)
        assert all(needle not in (value or b"") for value in values), key
    for log in Path(env["STACK_LOGS"]).glob("*.log"):
        assert needle not in log.read_bytes(), log


def test_out_of_memory_says_so_and_limits_are_per_run(user_env, tmp_path):
    (tmp_path / "grow.py").write_text(
        "blocks = []\nfor _ in range(40):\n"
        "    blocks.append(bytearray(16 * 1024 * 1024))\n"
        "quota = open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read().strip()\n"
        "print('grew to', len(blocks) * 16, 'MiB with a CPU quota of', quota)\n"
    )
    killed, result = run_json("run", "grow.py", "--memory", "128m", env=user_env, cwd=tmp_path)
    assert result.returncode == 137
    assert killed["status"] == "failed" and killed["exit_code"] == 137
    assert killed["error"] == "killed: out of memory (limit 128 MiB)"
    assert killed["memory_bytes"] == 128 * 1024**2
    roomy = run_cli("run", "grow.py", "--memory", "1g", "--cpus", "2", env=user_env, cwd=tmp_path)
    assert roomy.returncode == 0, roomy.stderr
    assert roomy.stdout == "grew to 640 MiB with a CPU quota of 200000\n"
    too_big = run_cli("run", "grow.py", "--memory", "64g", env=user_env, cwd=tmp_path)
    assert_one_line_error(too_big, "memory must be between 32 MiB and 8 GiB")
    assert too_big.returncode == 125


def test_thread_pools_are_told_the_cpu_limit_unless_the_user_says_otherwise(user_env, tmp_path):
    """numpy's OpenBLAS would start a thread per host core under a one-CPU quota (throttled:
    its import took half as long again), so the sandbox says how many CPUs the run has."""
    (tmp_path / "threads.py").write_text(
        "import os\nprint(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])\n"
    )
    default = run_cli("run", "threads.py", env=user_env, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert default.stdout == "1 1\n"
    two = run_cli("run", "threads.py", "--cpus", "2", env=user_env, cwd=tmp_path)
    assert two.stdout == "2 2\n", two.stderr
    own = run_cli("run", "threads.py", "--env", "OMP_NUM_THREADS=3", env=user_env, cwd=tmp_path)
    assert own.stdout == "1 3\n", own.stderr


def test_logs_follow_a_running_execution_from_another_terminal(user_env, tmp_path):
    (tmp_path / "tick.py").write_text(
        "import time\nfor i in range(15):\n    print('tick', i, flush=True)\n    time.sleep(0.2)\n"
    )
    running = start_cli("run", "tick.py", env=user_env, cwd=tmp_path)
    try:
        assert running.stdout.readline() == "tick 0\n"
        snapshot = run_cli("logs", "last", "--no-follow", env=user_env, cwd=tmp_path)
        assert snapshot.returncode == 0 and snapshot.stdout.startswith("tick 0\n")
        assert "is still running" in snapshot.stderr
        early = run_cli("outputs", "last", env=user_env, cwd=tmp_path)
        assert_one_line_error(early, "is still running")
        # A prefix of the id names it too, as in git.
        prefix = run_json("status", "last", env=user_env, cwd=tmp_path)[0]["execution_id"][:6]
        followed = run_cli("logs", prefix, env=user_env, cwd=tmp_path)
        assert followed.returncode == 0
        assert followed.stdout == "".join(f"tick {i}\n" for i in range(15))
        assert running.wait(60) == 0, running.stderr.read()
    finally:
        running.kill()


def test_json_error_before_submission_exit_codes_and_help(user_env, tmp_path):
    missing = run_cli("run", "nothere.py", "--json", env=user_env, cwd=tmp_path)
    assert missing.returncode == 125
    assert json.loads(missing.stdout) == {
        "status": "error",
        "error": "script not found: nothere.py",
    }
    bad_flag = run_cli("run", "x.py", "--no-such-flag", env=user_env, cwd=tmp_path)
    assert_one_line_error(bad_flag, "No such option")
    assert bad_flag.returncode == 125
    (tmp_path / "s.py").write_text("print('hi')\n")
    not_an_input = run_cli("run", "s.py", "hello", env=user_env, cwd=tmp_path)
    assert_one_line_error(not_an_input, "rgrid run SCRIPT -- hello")
    helped = run_cli("run", "-h", env=user_env, cwd=tmp_path)
    assert helped.returncode == 0
    for default in ("[default: 600]", "[default: 1g", "[default: 1,", "125", "124"):
        assert default in helped.stdout
    zero = run_cli("list", "--limit", "0", env=user_env, cwd=tmp_path)
    assert zero.returncode == 125 and "--limit" in zero.stderr


def test_list_rows_do_not_wrap_and_json_is_complete(user_env, tmp_path):
    name = "a-script-with-a-rather-long-name-" + "x" * 40 + ".py"
    (tmp_path / name).write_text("open('outputs/r.txt', 'w').write('r')\n")
    ran, _ = run_json("run", name, env=user_env, cwd=tmp_path)
    assert ran["dependency_cache_hit"] is None and ran["input_cache_hit"] is None
    assert ran["created_at"].endswith("+00:00") and ran["finished_at"].endswith("+00:00")
    assert Path(ran["outputs_dir"]).is_absolute()
    listed = run_cli("list", env=user_env, cwd=tmp_path)
    row = [line for line in listed.stdout.splitlines() if ran["execution_id"] in line]
    assert len(row) == 1 and name in row[0] and row[0].split()[-1].count(":") == 2
    rows = json.loads(run_cli("list", "--json", env=user_env, cwd=tmp_path).stdout)
    assert rows[0]["outputs_dir"] == ran["outputs_dir"]


def test_matplotlib_writes_a_png_without_warnings(stack_env, tmp_path):
    (tmp_path / "plot.py").write_text(
        "# /// script\n# dependencies = ['matplotlib']\n# ///\n"
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\nplt.savefig('outputs/plot.png')\nprint('saved')\n"
    )
    result = run_cli("run", "plot.py", env=stack_env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "saved\n"
    assert "Matplotlib" not in result.stderr and "writable" not in result.stderr
    execution_id = result.stderr.split("execution ", 1)[1].split()[0]
    png = tmp_path / "rgrid-outputs" / execution_id / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_memory_stays_flat_for_a_large_log(stack_env, tmp_path):
    """A 48 MiB log is paged: the CLI never holds it whole."""
    (tmp_path / "loud.py").write_text(
        "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(48 * 1024):\n"
        "    sys.stdout.write(line)\n"
    )
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    started = time.monotonic()
    measured = subprocess.run(
        [sys.executable, "-c", probe, RGRID, "run", "loud.py"],
        env=stack_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, max_rss_kib = (int(part) for part in measured.stdout.split())
    assert code == 0, (measured.stderr, time.monotonic() - started)
    assert max_rss_kib < 120 * 1024, f"the CLI grew to {max_rss_kib // 1024} MiB"


def test_an_output_name_as_long_as_a_name_can_be_comes_back(user_env, tmp_path):
    longest = "n" * 255
    (tmp_path / "names.py").write_text(
        f"open('outputs/{longest}', 'w').write('long')\nopen('outputs/ok.txt', 'w').write('ok')\n"
    )
    ran, result = run_json("run", "names.py", env=user_env, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    fetched = Path(ran["outputs_dir"])
    assert (fetched / longest).read_text() == "long"
    assert (fetched / "ok.txt").read_text() == "ok"
    assert sorted(p.name for p in fetched.iterdir()) == sorted([longest, "ok.txt"])


def test_an_endless_pipe_into_a_script_that_reads_three_lines(user_env, tmp_path):
    """`yes | rgrid run head3.py` ends when the script does, and the pipe never floods the
    server: a chunk waits until the script has read what is queued."""
    (tmp_path / "head3.py").write_text(
        "import sys\nfor _ in range(3):\n    print(sys.stdin.readline().strip())\n"
    )
    endless = subprocess.Popen(["yes", "y"], stdout=subprocess.PIPE)
    try:
        result = subprocess.run(
            [RGRID, "run", "head3.py"],
            stdin=endless.stdout,
            env=user_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        endless.kill()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "y\ny\ny\n"
