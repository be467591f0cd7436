"""The built wheel is the whole product: installed into a fresh virtualenv outside the checkout
and used from a folder outside it, it runs a script on the embedded default, loads the Celery
app and its settings, and migrates a new PostgreSQL database.

The new virtualenv takes RGrid's dependencies from this checkout's virtualenv (a ``.pth`` line
naming its site-packages: no network, a few seconds) but RGrid itself only from the wheel; the
test checks where every RGrid module was imported from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from scripts.devenv import fresh_database

REPO = Path(__file__).resolve().parents[2]
#: What a source tree holds that is not part of the product (the build must not see it).
NOT_SOURCE = (".git", ".venv", ".rgrid-dev", "build", "dist", "*.egg-info", "__pycache__")


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, **kwargs)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    # A copy of the tree, so that no build/ folder a developer left behind leaks into it.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _run(
        sys.executable,
        *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"),
        *("-w", str(root / "dist"), str(source)),
    )
    (wheel,) = (root / "dist").glob("rgrid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"celeryconfig.py", "workers/tasks.py", "migrations/env.py"} <= names
    assert {"migrations/script.py.mako", "migrations/versions/0001_initial.py"} <= names

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "checkout-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip sees the checkout's editable rgrid through the .pth line and must
    # neither uninstall it nor count it as already there.
    _run(
        str(venv / "bin" / "python"),
        *("-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q"),
        str(wheel),
    )
    return venv / "bin"


@pytest.fixture
def outside(tmp_path, embedded_env) -> dict[str, str]:
    """A user's environment whose home, data folder and working folder are outside the
    checkout."""
    assert not tmp_path.is_relative_to(REPO)
    return {**embedded_env, "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}


def test_the_wheel_carries_every_module_it_imports(installed, outside, tmp_path):
    code = (
        "import json, celeryconfig, migrations, rgrid, rgrid.cli, workers.celery_app\n"
        "print(json.dumps({m.__name__: m.__file__ for m in"
        " (celeryconfig, migrations, rgrid, rgrid.cli, workers.celery_app)}))"
    )
    found = json.loads(
        _run(str(installed / "python"), "-c", code, env=outside, cwd=tmp_path).stdout
    )
    site = installed.parent / "lib"
    for name, file in found.items():
        assert Path(file).is_relative_to(site), (name, file)
        assert not Path(file).is_relative_to(REPO), (name, file)


def test_the_embedded_default_runs_a_script(installed, outside, tmp_path):
    (tmp_path / "hello.py").write_text("print('hello from the wheel')\n")
    result = _run(str(installed / "rgrid"), "run", "hello.py", env=outside, cwd=tmp_path)
    assert result.stdout == "hello from the wheel\n"
    assert "succeeded · exit 0" in result.stderr


def test_the_celery_app_loads_and_asks_the_broker(installed, outside, tmp_path, redis_url):
    env = {**outside, "RGRID_REDIS_URL": redis_url}
    celery = [str(installed / "python"), "-m", "celery", "-A", "workers.celery_app"]
    report = _run(*celery, "report", env=env, cwd=tmp_path).stdout
    assert "task_default_queue" in report and "rgrid" in report
    ping = subprocess.run(
        [*celery, "inspect", "ping", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    # Another test session's worker may share this Redis database and answer; either way the
    # app loaded, reached the broker and got an answer or none.
    output = ping.stdout + ping.stderr
    assert "Traceback" not in output
    assert "pong" in output or "No nodes replied" in output, output


def test_the_installed_migrations_build_a_new_database(installed, outside, tmp_path):
    code = (
        "import sys, sqlalchemy, rgrid.core.db\n"
        "rgrid.core.db.upgrade(sys.argv[1])\n"
        "with sqlalchemy.create_engine(sys.argv[1]).connect() as conn:\n"
        "    print(conn.execute(sqlalchemy.text('select version_num from alembic_version'))"
        ".scalar_one())"
    )
    newest = max(p.stem for p in (REPO / "migrations" / "versions").glob("0*.py"))
    with fresh_database("rgrid_wheel") as url:
        result = _run(str(installed / "python"), "-c", code, url, env=outside, cwd=tmp_path)
    assert newest.startswith(result.stdout.strip()), (newest, result.stdout)
