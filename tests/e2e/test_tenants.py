"""Tenants cannot hurt each other (issue 10), through the real CLI against the running stack:
a private index's package never reaches an account without its password, and the worker host
fetches no package source the operator did not allow."""

import json
import secrets

from tests.e2e.conftest import assert_one_line_error, run_cli
from tests.index_server import private_index
from tests.wheels import make_wheel


def _other_account(stack_env, cwd) -> dict[str, str]:
    created = run_cli(
        "admin",
        "create-account",
        f"tenant-{secrets.token_hex(4)}",
        "--with-key",
        "--json",
        env=stack_env,
        cwd=cwd,
    )
    assert created.returncode == 0, created.stderr
    return {**stack_env, "RGRID_API_KEY": json.loads(created.stdout)["api_key"]}


def test_another_account_naming_a_private_index_without_its_password_gets_a_401(
    stack_env, tmp_path
):
    dist = f"privpkg-{secrets.token_hex(4)}"
    module = dist.replace("-", "_")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, dist, "1.0")
    (tmp_path / "job.py").write_text(f"import {module}\nprint('version', {module}.VERSION)\n")
    with private_index(wheels) as index:
        (tmp_path / "mine.txt").write_text(f"--index-url {index.url()}\n{dist}\n")
        (tmp_path / "theirs.txt").write_text(
            f"--index-url {index.url(credentials=False)}\n{dist}\n"
        )
        mine = run_cli("run", "job.py", "-r", "mine.txt", env=stack_env, cwd=tmp_path)
        assert mine.returncode == 0, mine.stderr
        assert mine.stdout == "version 1.0\n"
        before = len(index.requests)

        other_env = _other_account(stack_env, tmp_path)
        theirs = run_cli("run", "job.py", "-r", "theirs.txt", env=other_env, cwd=tmp_path)
        assert theirs.returncode == 125
        assert "build_failed" in theirs.stderr
        assert "package index 127.0.0.1 refused access (401 Unauthorized)" in theirs.stderr
        assert (f"/simple/{dist}/", False) in index.requests[before:]
    execution_id = theirs.stderr.split("execution ", 1)[1].split()[0]
    logs = run_cli("logs", execution_id, env=other_env, cwd=tmp_path)  # uv's lines included
    shown = logs.stdout + logs.stderr
    assert "refused access (401 Unauthorized)" in shown, shown
    for word in ("Downloading", "Prepared", "Installed", index.password):
        assert word not in shown, shown


def test_a_package_index_on_the_metadata_address_is_refused_in_one_line(stack_env, tmp_path):
    (tmp_path / "job.py").write_text("print('never runs')\n")
    (tmp_path / "req.txt").write_text("--index-url http://169.254.169.254/simple\nsix\n")
    result = run_cli("run", "job.py", "-r", "req.txt", env=stack_env, cwd=tmp_path)
    assert result.returncode == 125
    assert_one_line_error(result, "package index 169.254.169.254 is not allowed on this server")
    listed = run_cli("list", "--json", env=stack_env, cwd=tmp_path)
    assert "never runs" not in listed.stdout
