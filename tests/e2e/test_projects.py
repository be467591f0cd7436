"""Projects, not just scripts: a script's local modules and packages travel with it, through the
real CLI, embedded and against the running stack."""

import json
import os
import subprocess

import pytest
from uv import find_uv_bin

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json
from tests.wheels import make_wheel

MAIN = """\
import sys
from helpers import clean
from helpers.stats import total
import config
import json
import os
names = sorted(os.path.join(d, f) for d, _, fs in os.walk("data") for f in fs)
rows = [clean(line) for name in names for line in open(name)]
print("argv", sys.argv[1:])
print("total", total(rows), config.UNIT)
"""
HELPERS_INIT = "from .text import clean\n"
HELPERS_TEXT = "def clean(line):\n    return int(line.strip())\n"
HELPERS_STATS = "from . import text  # noqa\n\ndef total(rows):\n    return sum(rows)\n"
CONFIG = 'UNIT = "apples"\n'


@pytest.fixture(params=["embedded", "stack"])
def env(request):
    return request.getfixturevalue("embedded_env" if request.param == "embedded" else "stack_env")


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "helpers").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    (root / "main.py").write_text(MAIN)
    (root / "helpers" / "__init__.py").write_text(HELPERS_INIT)
    (root / "helpers" / "text.py").write_text(HELPERS_TEXT)
    (root / "helpers" / "stats.py").write_text(HELPERS_STATS)
    (root / "config.py").write_text(CONFIG)
    (root / "unused.py").write_text("raise SystemExit('never imported, never shipped')\n")
    (root / "data" / "a.txt").write_text("1\n2\n")
    (root / "data" / "b.txt").write_text("3\n")
    return root


SHIPPED = ["config.py", "helpers/__init__.py", "helpers/stats.py", "helpers/text.py"]


def test_a_project_runs_with_its_modules_which_are_no_arguments(env, project):
    first, result = run_json("run", "main.py", "data/", "-a", "--flag", env=env, cwd=project)
    assert first["status"] == "succeeded", result.stderr
    assert "argv ['data', '--flag']" in result.stderr
    assert "total 6 apples" in result.stderr
    assert sorted(item["path"] for item in first["sources"]) == SHIPPED
    assert first["script_name"] == "main.py"

    # A repeat sends nothing and is a script cache hit.
    second, _ = run_json("run", "main.py", "data/", "-a", "--flag", env=env, cwd=project)
    assert second["status"] == "succeeded"
    assert second["bytes_uploaded"] == 0 and second["script_cache_hit"] is True
    assert second["source_digest"] == first["source_digest"]

    # One edited module: a miss that uploads that module's bytes only.
    edited = HELPERS_STATS.replace("sum(rows)", "sum(rows) * 10")
    (project / "helpers" / "stats.py").write_text(edited)
    third, result = run_json("run", "main.py", "data/", "-a", "--flag", env=env, cwd=project)
    assert third["status"] == "succeeded", result.stderr
    assert "total 60 apples" in result.stderr
    assert third["script_cache_hit"] is False
    assert third["source_digest"] != first["source_digest"]
    assert third["bytes_uploaded"] == len(edited.encode()) and third["files_uploaded"] == 1

    human = run_cli("run", "main.py", "-v", env=env, cwd=project)
    assert "sources: 4 module file(s) shipped, 0 uploaded (0 B)" in human.stderr
    assert "  helpers/stats.py" in human.stderr
    status = run_cli("status", third["execution_id"], env=env, cwd=project)
    assert "helpers/text.py" in status.stdout and third["source_digest"] in status.stdout


def test_an_edited_module_rides_inline_in_the_submission(stack_env, project):
    """Against the stack a small missing file is carried in the submission's own body: no
    upload of its own (POST /uploads, presigned PUT, completion), yet stored as a blob, so
    that a repeat sends nothing."""
    first, result = run_json("run", "main.py", "data/", env=stack_env, cwd=project)
    assert first["status"] == "succeeded", result.stderr
    edited = HELPERS_TEXT.replace("int(line.strip())", "int(line.strip()) * 2")
    (project / "helpers" / "text.py").write_text(edited)
    human = run_cli("run", "main.py", "data/", "-v", env=stack_env, cwd=project)
    assert human.returncode == 0, human.stderr
    assert "total 12 apples" in human.stdout
    size = len(edited.encode())
    assert f"4 module file(s) shipped, 1 uploaded ({size} B), 1 inline" in human.stderr
    again, result = run_json("run", "main.py", "data/", env=stack_env, cwd=project)
    assert again["status"] == "succeeded", result.stderr
    assert again["bytes_uploaded"] == 0 and again["script_cache_hit"] is True


def test_a_script_in_a_subfolder_runs_as_python_sub_main_py(env, project):
    tools = project / "tools"
    tools.mkdir()
    (tools / "report.py").write_text(
        "import sys, local_helper\nprint('report', local_helper.VALUE, sys.argv[1:])\n"
    )
    (tools / "local_helper.py").write_text("VALUE = 42\n")
    # From the project root, and from the subfolder itself.
    for cwd, script in ((project, "tools/report.py"), (tools, "report.py")):
        execution, result = run_json("run", script, "-a", "x", env=env, cwd=cwd)
        assert execution["status"] == "succeeded", result.stderr
        assert "report 42 ['x']" in result.stderr
        assert execution["script_name"] == "tools/report.py"
        assert [item["path"] for item in execution["sources"]] == ["tools/local_helper.py"]


def test_a_dynamic_import_is_shipped_with_with_module(env, project):
    (project / "dyn.py").write_text(
        "import importlib\nprint('plugin', importlib.import_module('plugin').NAME)\n"
    )
    (project / "plugin.py").write_text("NAME = 'loaded'\n")
    missing = run_cli("run", "dyn.py", env=env, cwd=project)
    assert missing.returncode == 1 and "No module named 'plugin'" in missing.stderr
    found = run_cli("run", "dyn.py", "--with-module", "plugin", env=env, cwd=project)
    assert found.returncode == 0, found.stderr
    assert "plugin loaded" in found.stdout
    refused = run_cli("run", "dyn.py", "--with-module", "nosuch", env=env, cwd=project)
    assert_one_line_error(refused, "--with-module nosuch: no such module")
    assert refused.returncode == 125


def test_a_syntax_error_in_a_module_is_the_scripts_own_error(env, project):
    (project / "config.py").write_text("UNIT = (\n")
    result = run_cli("run", "main.py", "data/", env=env, cwd=project)
    assert result.returncode == 1
    assert "SyntaxError" in result.stderr and "config.py" in result.stderr


def test_a_module_linking_outside_the_project_is_refused(embedded_env, project, tmp_path):
    outside = tmp_path / "elsewhere.py"
    outside.write_text("UNIT = 'stolen'\n")
    (project / "config.py").unlink()
    os.symlink(outside, project / "config.py")
    result = run_cli("run", "main.py", "data/", env=embedded_env, cwd=project)
    assert_one_line_error(result, "module config.py is a link pointing outside the project")
    assert result.returncode == 125
    listed = run_cli("list", "--json", env=embedded_env, cwd=project)
    assert listed.stdout.strip() in ("[]", "")  # nothing was submitted


def test_the_closure_bound_is_refused_before_anything_is_sent(embedded_env, project):
    env = {**embedded_env, "RGRID_MAX_SOURCE_FILES": "3"}
    result = run_cli("run", "main.py", "data/", env=env, cwd=project)
    assert_one_line_error(result, "more than 3 local files (RGRID_MAX_SOURCE_FILES)")
    env = {**embedded_env, "RGRID_MAX_SOURCE_BYTES": "100"}
    result = run_cli("run", "main.py", "data/", env=env, cwd=project)
    assert_one_line_error(result, "over the limit of 100 (RGRID_MAX_SOURCE_BYTES)")


DEPS_MAIN = "import projdep\nprint('projdep', projdep.VERSION)\n"


def _deps_project(tmp_path, deps: str) -> tuple:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "projdep", "1.0")
    root = tmp_path / "withdeps"
    root.mkdir()
    (root / "main.py").write_text(DEPS_MAIN)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "withdeps"\nversion = "0"\nrequires-python = ">=3.11"\n'
        f"dependencies = [{deps}]\n\n[tool.uv]\nfind-links = [{str(wheels)!r}]\n"
    )
    return root, wheels


def test_pyproject_dependencies_are_installed(env, tmp_path):
    root, wheels = _deps_project(tmp_path, '"projdep"')
    make_wheel(wheels, "projdep", "2.0")
    execution, result = run_json("run", "main.py", env=env, cwd=root)
    assert execution["status"] == "succeeded", result.stderr
    assert "projdep 2.0" in result.stderr
    assert execution["dependency_source"] == "pyproject.toml"
    assert (
        "dependencies: from pyproject.toml" in run_cli("run", "main.py", env=env, cwd=root).stderr
    )


def test_a_uv_lock_pin_is_honoured_and_an_old_lock_refused(env, tmp_path):
    root, wheels = _deps_project(tmp_path, '"projdep"')
    locked = subprocess.run(
        [find_uv_bin(), "lock", "--offline", "--quiet"], cwd=root, capture_output=True, text=True
    )
    assert locked.returncode == 0, locked.stderr
    make_wheel(wheels, "projdep", "2.0")  # a newer release than the lock's
    execution, result = run_json("run", "main.py", env=env, cwd=root)
    assert execution["status"] == "succeeded", result.stderr
    assert "projdep 1.0" in result.stderr
    assert execution["dependency_source"] == "uv.lock"
    assert execution["resolved_dependencies"] == ["projdep==1.0"]
    log = run_cli("logs", execution["execution_id"], env=env, cwd=root)
    assert "dependencies from uv.lock" in log.stderr
    status = run_cli("status", execution["execution_id"], env=env, cwd=root)
    assert "dependency_source      uv.lock" in status.stdout

    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('["projdep"]', '["projdep>=2"]'))
    refused = run_cli("run", "main.py", env=env, cwd=root)
    assert_one_line_error(refused, "uv.lock in")
    assert refused.returncode == 125


def test_requirements_txt_beside_the_script_and_r_overrides(embedded_env, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "projdep", "1.0")
    make_wheel(wheels, "projdep", "2.0")
    (tmp_path / "main.py").write_text(DEPS_MAIN)
    (tmp_path / "requirements.txt").write_text(f"--find-links {wheels}\nprojdep==1.0\n")
    (tmp_path / "other.txt").write_text(f"--find-links {wheels}\nprojdep==2.0\n")
    execution, result = run_json("run", "main.py", env=embedded_env, cwd=tmp_path)
    assert "projdep 1.0" in result.stderr and execution["dependency_source"] == "requirements.txt"
    execution, result = run_json(
        "run", "main.py", "-r", "other.txt", env=embedded_env, cwd=tmp_path
    )
    assert "projdep 2.0" in result.stderr and execution["dependency_source"] == "-r other.txt"


def test_run_a_module_with_m_as_python_m_does(env, project):
    (project / "helpers" / "__main__.py").write_text(
        "import sys\nfrom .stats import total\n"
        "print('main of helpers', total([1, 2]), sys.argv[1:])\n"
    )
    execution, result = run_json("run", "-m", "helpers", "data/", "-a", "z", env=env, cwd=project)
    assert execution["status"] == "succeeded", result.stderr
    assert "main of helpers 3 ['data', 'z']" in result.stderr
    assert execution["module"] == "helpers" and execution["script_name"] == "helpers/__main__.py"
    assert "helpers/stats.py" in [item["path"] for item in execution["sources"]]
    execution, result = run_json("run", "-m", "helpers.text", env=env, cwd=project)
    assert execution["status"] == "succeeded", result.stderr
    refused = run_cli("run", "-m", "nowhere.mod", env=env, cwd=project)
    assert_one_line_error(refused, "-m nowhere.mod: no module nowhere.mod")


def test_a_batch_ships_the_tree_once_for_all_its_executions(env, project):
    (project / "each.py").write_text(
        "import sys\nfrom helpers import clean\nimport config\n"
        "print('item', sum(clean(line) for line in open(sys.argv[1])), config.UNIT)\n"
    )
    result = run_cli("run", "each.py", "--batch", "data/*.txt", "--json", env=env, cwd=project)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    *executions, summary = lines
    assert result.returncode == 0, result.stderr
    assert summary["counts"] == {"succeeded": 2}
    assert sorted(e["args"][0] for e in executions) == ["data/a.txt", "data/b.txt"]
    assert all(e["source_digest"] == executions[0]["source_digest"] for e in executions)
    assert all(
        sorted(s["path"] for s in e["sources"])
        == ["config.py", "helpers/__init__.py", "helpers/text.py"]
        for e in executions
    )
    logs = run_cli("logs", executions[0]["execution_id"], env=env, cwd=project)
    assert "apples" in logs.stdout
