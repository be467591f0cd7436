"""Bad input that the CLI refuses before contacting anything: one line, non-zero exit."""

import pytest
from click.testing import CliRunner

from rgrid.cli import cli
from rgrid.cli import executions as _commands  # noqa: F401 - registers the commands


@pytest.fixture
def runner(monkeypatch):
    # Pointing at a closed port proves these errors come before any request.
    monkeypatch.setenv("RGRID_API_URL", "http://127.0.0.1:9")
    return CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_script(runner, tmp_path):
    result = runner.invoke(cli, ["run", str(tmp_path / "nope.py")])
    assert "script not found" in _one_line_error(result)


def test_non_utf8_script(runner, tmp_path):
    path = tmp_path / "latin1.py"
    path.write_bytes("print('caf\xe9')\n".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(runner.invoke(cli, ["run", str(path)]))


def test_directory_is_not_a_script(runner, tmp_path):
    assert "not a file" in _one_line_error(runner.invoke(cli, ["run", str(tmp_path)]))


def test_zero_timeout(runner, tmp_path):
    path = tmp_path / "ok.py"
    path.write_text("pass\n")
    result = runner.invoke(cli, ["run", str(path), "--timeout", "0"])
    assert "--timeout" in _one_line_error(result)


def test_api_unreachable(runner, tmp_path):
    path = tmp_path / "ok.py"
    path.write_text("pass\n")
    result = runner.invoke(cli, ["run", str(path)])
    assert "cannot reach the RGrid API" in _one_line_error(result)
    assert result.exit_code == 125
