"""The CLI with no server configured: the embedded default."""

from pathlib import Path

import docker

from rgrid.core.cache_keys import HOST_DIR_LABEL
from rgrid.host.sandbox import POOL_NAME_PREFIX
from tests.e2e.conftest import assert_one_line_error, run_cli, run_json


def _pool_sandboxes(data_dir: Path) -> list[dict]:
    """Unclaimed sandboxes whose host folders are under ``data_dir``."""
    running = docker.from_env().api.containers(filters={"label": HOST_DIR_LABEL})
    return [
        c
        for c in running
        if c["Names"][0].lstrip("/").startswith(POOL_NAME_PREFIX)
        and Path(c["Labels"][HOST_DIR_LABEL]).is_relative_to(data_dir)
    ]


def test_embedded_run_twice_hits_cache(embedded_env, tmp_path):
    (tmp_path / "hello.py").write_text("print('hi')\nopen('outputs/o.txt','w').write('o')\n")
    first, result = run_json("run", "hello.py", env=embedded_env, cwd=tmp_path)
    assert result.returncode == 0 and first["status"] == "succeeded"
    assert first["script_cache_hit"] is False
    assert (tmp_path / first["outputs_dir"] / "o.txt").read_text() == "o"
    second, _ = run_json("run", "hello.py", env=embedded_env, cwd=tmp_path)
    assert second["script_cache_hit"] is True
    # A run leaves a pre-started sandbox for the next (one at most of its own: another
    # installation on this Docker host may already keep one warm for the same runtime).
    assert second["sandbox_warm"] is True
    assert len(_pool_sandboxes(tmp_path / ".rgrid-data")) <= 1

    status = run_cli("status", second["execution_id"], env=embedded_env, cwd=tmp_path)
    assert "succeeded" in status.stdout
    logs = run_cli("logs", second["execution_id"], env=embedded_env, cwd=tmp_path)
    assert logs.stdout == "hi\n"
    assert (tmp_path / ".rgrid-data" / "rgrid.db").exists()


def test_embedded_docker_unreachable(embedded_env, tmp_path):
    (tmp_path / "hello.py").write_text("print('hi')\n")
    env = {**embedded_env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    result = run_cli("run", "hello.py", env=env, cwd=tmp_path)
    assert_one_line_error(result, "cannot reach the Docker engine")
    assert result.returncode == 125
    listed = run_cli("list", "--json", env=env, cwd=tmp_path)
    assert listed.stdout.strip() == "[]"
