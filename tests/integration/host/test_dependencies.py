"""Dependency sets on the real services, the real package index (through the host's own
configuration) and Docker: each installed once into a folder on the worker host."""

import functools
import http.server
import secrets
import threading

import pytest

from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.core.models import DependencyCache
from tests.conftest import stored_log, stored_phases
from tests.wheels import make_sdist, make_wheel

IMPORTS = "import numpy, six\nprint('numpy', numpy.__version__, 'six', six.__version__)\n"


def _folders(ctx) -> set[str]:
    """Every entry in this host's environments folder, temporary ones included."""
    root = ctx.settings.environments_dir
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_packages_are_installed_once_and_an_edited_script_installs_nothing(ctx, run_script):
    first = run_script(IMPORTS, requirements="numpy\nsix==1.16.0\n")
    assert first["status"] == "succeeded", first["error"]
    assert first["dependency_cache_hit"] is False and first["deps_build_s"] is not None
    assert "six==1.16.0" in first["resolved_dependencies"]
    assert any(pin.startswith("numpy==") for pin in first["resolved_dependencies"])
    assert stored_log(ctx, first["execution_id"], "stdout").startswith("numpy 2.")
    assert "resolving and installing 2 requirement(s)" in stored_phases(ctx, first["execution_id"])
    # uv's own words are kept in the log (shown with -v and by `rgrid logs`), RGrid's summary
    # is a note.
    assert "Installed 2 packages" in stored_log(ctx, first["execution_id"], "detail")
    assert "installed 2 package(s)" in stored_log(ctx, first["execution_id"], "system")
    assert (ctx.settings.environments_dir / first["environment"]).is_dir()

    # Same set in another order and case; an edited script.
    edited = run_script(IMPORTS + "print('edited')\n", requirements="SIX==1.16.0\n\nnumpy\n")
    assert edited["status"] == "succeeded"
    assert edited["dependency_hash"] == first["dependency_hash"]
    assert edited["dependency_cache_hit"] is True and edited["deps_build_s"] is None
    assert edited["script_cache_hit"] is False
    assert edited["environment"] == first["environment"]
    assert stored_log(ctx, edited["execution_id"], "detail") == ""
    assert "installed" not in stored_log(ctx, edited["execution_id"], "system")
    assert not [p for p in stored_phases(ctx, edited["execution_id"]) if "install" in p]
    assert stored_log(ctx, edited["execution_id"], "stdout").endswith("edited\n")

    again = run_script(IMPORTS + "print('edited')\n", requirements="numpy\nsix==1.16.0\n")
    assert again["script_cache_hit"] is True and again["dependency_cache_hit"] is True


def test_the_same_script_with_other_requirements_never_reuses_an_environment(ctx, run_script):
    script = "import six\nprint(six.__version__)\n"
    old = run_script(script, requirements="six==1.16.0\n")
    new = run_script(script, requirements="six==1.17.0\n")
    assert new["script_cache_hit"] is False
    assert new["environment"] != old["environment"]
    assert stored_log(ctx, old["execution_id"], "stdout") == "1.16.0\n"
    assert stored_log(ctx, new["execution_id"], "stdout") == "1.17.0\n"


PEP723 = """\
# /// script
# requires-python = ">=3.11"
# dependencies = ["six==1.16.0"]
# ///
import six
print("six", six.__version__)
"""


def test_inline_script_metadata_gets_its_packages(ctx, run_script):
    result = run_script(PEP723)
    assert result["status"] == "succeeded", result["error"]
    assert result["resolved_dependencies"] == ["six==1.16.0"]
    assert stored_log(ctx, result["execution_id"], "stdout") == "six 1.16.0\n"


def test_inline_metadata_and_a_requirements_file_together_are_refused(ctx, account):
    from rgrid.service import executions as svc

    with session_scope(ctx.session_factory) as session, pytest.raises(BadInput, match="one of"):
        svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script=PEP723,
            script_name="job.py",
            requirements="six\n",
        )


def _dependency_rows(ctx, account_id: int) -> list:
    with session_scope(ctx.session_factory) as session:
        return list(session.query(DependencyCache).filter_by(account_id=account_id))


@pytest.mark.parametrize(
    ("requirements", "message"),
    [
        ("rgrid-no-such-package-7f3a\n", "not found in the package registry"),
        ("six==1.16.0\nsix==1.17.0\n", "unsatisfiable"),
    ],
)
def test_bad_requirements_fail_the_build_with_the_installers_message(
    ctx, run_script, account, requirements, message
):
    result = run_script("import six\n", requirements=requirements)
    assert result["status"] == "build_failed"
    assert message in result["error"]
    assert message in stored_log(ctx, result["execution_id"], "system")
    assert _dependency_rows(ctx, account.id) == []
    fixed = run_script("import six\n", requirements="six==1.16.0\n")
    assert fixed["status"] == "succeeded"


def test_a_package_with_no_wheel_for_the_runtime_fails_clearly(ctx, run_script, account, tmp_path):
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_sdist(tmp_path, dist, "1.0")
    result = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}\n")
    assert result["status"] == "build_failed"
    assert "wheel" in result["error"].lower() or "binary" in result["error"].lower()
    assert _dependency_rows(ctx, account.id) == []


def test_refresh_deps_picks_up_a_new_release_and_reuses_an_unchanged_one(ctx, run_script, tmp_path):
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    module = dist.replace("-", "_")
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    script = f"import {module}\nprint({module}.VERSION)\n"

    first = run_script(script, requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    assert first["resolved_dependencies"] == [f"{dist}==1.0"]

    make_wheel(tmp_path, dist, "1.1")
    stale = run_script(script, requirements=requirements)
    assert stale["dependency_cache_hit"] is True and stale["script_cache_hit"] is True
    assert stored_log(ctx, stale["execution_id"], "stdout") == "1.0\n"  # the classic stale cache

    refreshed = run_script(script, requirements=requirements, refresh_deps=True)
    assert refreshed["status"] == "succeeded", refreshed["error"]
    assert refreshed["resolved_dependencies"] == [f"{dist}==1.1"]
    assert refreshed["environment"] != first["environment"]
    assert refreshed["script_cache_hit"] is False  # it runs in another environment now
    assert stored_log(ctx, refreshed["execution_id"], "stdout") == "1.1\n"

    folders = _folders(ctx)
    unchanged = run_script(script, requirements=requirements, refresh_deps=True)
    assert unchanged["status"] == "succeeded", unchanged["error"]
    assert unchanged["environment"] == refreshed["environment"]
    assert _folders(ctx) == folders  # the same set again: the folder it has is kept

    after = run_script(script, requirements=requirements)  # the cache now serves 1.1
    assert after["dependency_cache_hit"] is True
    assert stored_log(ctx, after["execution_id"], "stdout") == "1.1\n"


def test_two_texts_resolving_to_the_same_pins_share_one_folder(ctx, run_script, tmp_path):
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "2.0")
    exact = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}==2.0\n")
    folders = _folders(ctx)
    assert exact["environment"] in folders
    ranged = run_script("pass\n", requirements=f"--find-links {tmp_path}\n{dist}>=2,<3\n")
    assert exact["dependency_hash"] != ranged["dependency_hash"]
    assert ranged["status"] == "succeeded" and ranged["dependency_cache_hit"] is False
    assert ranged["environment"] == exact["environment"]
    assert _folders(ctx) == folders  # no second folder, no temporary one left behind


def test_concurrent_runs_with_new_requirements_install_once(
    ctx, submit, run_concurrently, tmp_path
):
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    folders = _folders(ctx)
    rows = run_concurrently([submit("print('x')\n", requirements=requirements) for _ in range(4)])
    assert [r["status"] for r in rows] == ["succeeded"] * 4
    assert sum(r["deps_build_s"] is not None for r in rows) == 1
    assert len({r["environment"] for r in rows}) == 1
    assert _folders(ctx) - folders == {rows[0]["environment"]}


def test_a_locked_set_is_installed_from_its_pins_without_resolving(ctx, run_script, tmp_path):
    """A uv.lock's export (``--locked`` first, as rgrid/client/sources.py sends it) is the
    resolution: its pins go in as they are. Proof that no resolver ran: the pinned wheel
    declares a dependency that exists nowhere, which any resolution would fail on."""
    dist = f"locked-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0", requires=("nowhere-to-be-found-rgrid>=1",))
    module = dist.replace("-", "_")
    script = f"import {module}\nprint('version', {module}.VERSION)\n"
    unlocked = run_script(script, requirements=f"--find-links {tmp_path}\n{dist}==1.0\n")
    assert unlocked["status"] == "build_failed"  # resolving needs the missing dependency
    locked = f"--locked\n--find-links {tmp_path}\n{dist}==1.0 ; python_version >= '3'\n"
    result = run_script(script, requirements=locked)
    assert result["status"] == "succeeded", result["error"]
    assert "version 1.0" in stored_log(ctx, result["execution_id"], "stdout")
    assert result["resolved_dependencies"] == [f"{dist}==1.0"]
    phases = stored_phases(ctx, result["execution_id"])
    assert "installing 1 locked package(s), nothing to resolve" in phases, phases
    assert not [p for p in phases if "resolving" in p]


class _CountingIndex(http.server.SimpleHTTPRequestHandler):
    """A find-links page and its wheels, counting what it is asked."""

    asked: list[str]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.asked.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def test_pins_already_in_the_uv_cache_are_installed_asking_no_index(ctx, run_script, tmp_path):
    """A lock's pins are the resolution: a new set whose wheels uv has cached installs without
    a request to the index (as `uv run` of a lock asks none); a pin the cache lacks is still
    fetched, and the failed cache-only attempt before it leaves no word in the log."""
    served, local = tmp_path / "served", tmp_path / "local"
    dist, other, late = (f"idx-{secrets.token_hex(3)}" for _ in range(3))
    served.mkdir()
    local.mkdir()
    make_wheel(served, dist, "1.0")
    make_wheel(local, other, "1.0")
    asked: list[str] = []
    handler = type("Index", (_CountingIndex,), {"asked": asked})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"--find-links http://127.0.0.1:{server.server_port}/"
    modules = [name.replace("-", "_") for name in (dist, other, late)]
    try:
        first = run_script(
            f"import {modules[0]}\n", requirements=f"--locked\n{index}\n{dist}==1.0\n"
        )
        assert first["status"] == "succeeded", first["error"]
        assert asked  # the first install fetched the wheel

        asked.clear()
        both = f"--locked\n{index}\n--find-links {local}\n{dist}==1.0\n{other}==1.0\n"
        second = run_script(
            f"import {modules[0]}, {modules[1]}\nprint('both')\n", requirements=both
        )
        assert second["status"] == "succeeded", second["error"]
        assert second["dependency_cache_hit"] is False
        assert sorted(second["resolved_dependencies"]) == sorted([f"{dist}==1.0", f"{other}==1.0"])
        assert asked == []
        assert stored_log(ctx, second["execution_id"], "stdout") == "both\n"

        make_wheel(served, late, "1.0")
        third = run_script(
            f"import {modules[2]}\n", requirements=f"--locked\n{index}\n{late}==1.0\n"
        )
        assert third["status"] == "succeeded", third["error"]
        assert asked  # not cached: asked for after all
        log = stored_log(ctx, third["execution_id"])
        assert "error" not in log.lower() and "offline" not in log.lower(), log
    finally:
        server.shutdown()
        server.server_close()
