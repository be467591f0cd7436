"""Where an execution ran, as the CLI shows it: `host` in `run --json` and `status --json`, and
a HOST column in `rgrid list`."""

import socket

from tests.e2e.conftest import run_cli, run_json


def test_the_host_an_execution_ran_on_is_shown(stack_env, tmp_path):
    (tmp_path / "where.py").write_text("print('here')\n")
    # The stack's worker has no RGRID_HOST_NAME: its host is the machine's name.
    host = socket.gethostname()

    ran, result = run_json("run", "where.py", env=stack_env, cwd=tmp_path)
    assert result.returncode == 0 and ran["status"] == "succeeded"
    assert ran["host"] == host

    status, _ = run_json("status", ran["execution_id"], env=stack_env, cwd=tmp_path)
    assert status["host"] == host

    listed = run_cli("list", "--limit", "50", env=stack_env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert "HOST" in header.split()
    row = next(line for line in rows if line.startswith(ran["execution_id"]))
    assert host in row.split()
