"""Environments on the real services and Docker: a runtime image plus, when a script has
requirements, one dependency set installed in a folder on the worker host and mounted
read-only. Nothing is ever built for a script."""

from __future__ import annotations

import secrets

import docker
import pytest

from rgrid.core.db import session_scope
from rgrid.core.models import Execution
from rgrid.host import environments
from rgrid.pipeline.build import build_step
from rgrid.pipeline.chain import run_all
from rgrid.pipeline.hash import hash_step
from rgrid.pipeline.lookup import cache_lookup_step
from rgrid.pipeline.run import run_step
from rgrid.pipeline.store import store_step
from tests.conftest import stored_log, stored_phases
from tests.integration.host.test_dependencies import _folders
from tests.wheels import make_wheel

#: The bench builds its ``docker build`` floor's images under this name, maybe meanwhile.
BENCH_REPOSITORY = "rgrid-bench-floor:"

#: Every engine call that makes or names an image.
IMAGE_CALLS = (
    "build",
    "commit",
    "import_image",
    "import_image_from_data",
    "import_image_from_file",
    "import_image_from_stream",
    "import_image_from_url",
    "import_image_from_image",
    "pull",
    "tag",
)


def _image_tags() -> set[str]:
    images = docker.from_env().api.images()
    tags = {tag for image in images for tag in image.get("RepoTags") or []}
    return {tag for tag in tags if not tag.startswith(BENCH_REPOSITORY)}


@pytest.fixture
def image_calls(ctx, monkeypatch) -> list[str]:
    """The image-making engine calls RGrid makes during the test (the pipeline, its pool
    refills and its bytecode compiles all use ``ctx.docker``)."""
    made: list[str] = []
    for name in IMAGE_CALLS:
        original = getattr(ctx.docker.api, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            made.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(ctx.docker.api, name, spy)
    return made


@pytest.fixture
def probe(tmp_path):
    """A package of the test's own (version 1.0) in a --find-links folder: returns
    (requirements text, module name, folder)."""
    dist = f"rgrid-probe-{secrets.token_hex(4)}"
    make_wheel(tmp_path, dist, "1.0")
    return f"--find-links {tmp_path}\n{dist}\n", dist.replace("-", "_"), tmp_path


@pytest.mark.parametrize("with_requirements", [True, False], ids=["with-deps", "no-deps"])
def test_an_edited_script_never_triggers_a_build(
    ctx, run_script, probe, image_calls, with_requirements
):
    requirements, module, _ = probe
    options = {"requirements": requirements} if with_requirements else {}
    imports = f"import {module}\n" if with_requirements else ""
    first = run_script(imports + "print('v1')\n", **options)
    assert first["status"] == "succeeded", first["error"]
    ctx.join_background()  # the pool refill and the bytecode compile, off the user's path
    tags, folders = _image_tags(), _folders(ctx)

    edited = run_script(imports + "print('v2')\n", **options)
    assert edited["status"] == "succeeded", edited["error"]
    assert stored_log(ctx, edited["execution_id"], "stdout") == "v2\n"
    assert edited["script_cache_hit"] is False
    assert edited["dependency_cache_hit"] is (True if with_requirements else None)
    assert edited["deps_build_s"] is None
    assert edited["environment"] == first["environment"]
    assert edited["sandbox_warm"] is True  # it only waited for the script
    assert stored_phases(ctx, edited["execution_id"]) == []
    assert stored_log(ctx, edited["execution_id"], "detail") == ""
    ctx.join_background()
    assert image_calls == []  # no image, no layer, for the script or anything else
    assert _image_tags() == tags
    assert _folders(ctx) == folders


def test_the_dependency_folder_is_mounted_read_only(ctx, run_script, probe):
    requirements, module, _ = probe
    first = run_script(f"import {module}\n", requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    folder = ctx.settings.environments_dir / first["environment"]
    # Open the folder and a package file to everyone on the host: only the mount can now stop
    # a write (as for the embedded default, whose sandbox runs as the folder's owner).
    (folder).chmod(0o777)
    (folder / module / "__init__.py").chmod(0o666)
    script = f"""
import errno, sys, {module}
mount = [row.split() for row in open("/proc/self/mountinfo") if row.split()[4] == "/opt/rgrid/deps"]
print("mount", mount[0][5].split(",")[0])
print("importable from", {module}.__file__)
for path, mode in (("/opt/rgrid/deps/planted.py", "w"), ({module}.__file__, "a")):
    try:
        with open(path, mode) as fh:
            fh.write("print('planted')\\n")
        print("wrote", path)
    except OSError as exc:
        print("refused", errno.errorcode[exc.errno])
"""
    result = run_script(script, requirements=requirements)
    assert result["status"] == "succeeded", stored_log(ctx, result["execution_id"], "stderr")
    assert result["environment"] == first["environment"]
    lines = stored_log(ctx, result["execution_id"], "stdout").splitlines()
    assert lines[0] == "mount ro"
    assert lines[1] == f"importable from /opt/rgrid/deps/{module}/__init__.py"
    assert lines[2:] == ["refused EROFS", "refused EROFS"]
    assert not (folder / "planted.py").exists()
    assert (folder / module / "__init__.py").read_text() == "VERSION = '1.0'\n"


def test_a_requirements_set_that_installs_nothing_runs_with_no_environment(ctx, run_script):
    requirements = "pywin32 ; sys_platform == 'win32'\n"
    folders = _folders(ctx)
    first = run_script("import sys\nprint(sys.platform)\n", requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    assert stored_log(ctx, first["execution_id"], "stdout") == "linux\n"
    assert first["environment"] is None and first["resolved_dependencies"] == []
    assert first["dependency_cache_hit"] is False
    assert "the requirements install nothing" in stored_log(ctx, first["execution_id"], "system")
    assert _folders(ctx) == folders  # no folder, not even an empty or temporary one

    ctx.join_background()  # the pool refilled: the phases below are the run's own
    again = run_script("import sys\nprint(sys.platform)\n", requirements=requirements)
    assert again["status"] == "succeeded"
    assert again["dependency_cache_hit"] is True and again["script_cache_hit"] is True
    assert again["deps_build_s"] is None and stored_phases(ctx, again["execution_id"]) == []


def test_a_vanished_environment_is_installed_again_from_its_pins(ctx, run_script, probe):
    """The folder is gone (evicted, or another disk): a miss, not an error. The stored pins
    are installed again without resolving, so a release published since changes nothing."""
    requirements, module, wheels = probe
    script = f"import {module}\nprint({module}.VERSION)\n"
    first = run_script(script, requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    ctx.join_background()  # warm sandboxes for the environment are waiting
    folder = ctx.settings.environments_dir / first["environment"]
    # As the product evicts: the bytecode compile may still be writing into the folder.
    environments.remove(ctx.settings.environments_dir, first["environment"])
    assert not folder.exists()
    make_wheel(wheels, f"rgrid-probe-{module.rsplit('_', 1)[1]}", "1.1")  # would win a resolve

    second = run_script(script, requirements=requirements)
    assert second["status"] == "succeeded", stored_log(ctx, second["execution_id"], "stderr")
    assert stored_log(ctx, second["execution_id"], "stdout") == "1.0\n"
    assert second["dependency_cache_hit"] is False and second["deps_build_s"] is not None
    assert second["resolved_dependencies"] == first["resolved_dependencies"]
    phases = stored_phases(ctx, second["execution_id"])
    assert "installing 1 package(s)" in phases
    assert not [p for p in phases if p.startswith("resolving")]
    assert second["environment"] == first["environment"] and folder.is_dir()

    third = run_script(script, requirements=requirements)
    assert third["dependency_cache_hit"] is True and third["script_cache_hit"] is True
    assert stored_log(ctx, third["execution_id"], "stdout") == "1.0\n"


def test_an_environment_evicted_between_lookup_and_run_is_installed_again(ctx, submit, probe):
    requirements, module, _ = probe
    script = f"import {module}\nprint({module}.VERSION)\n"
    first = submit(script, requirements=requirements)
    run_all(ctx, first)
    ctx.join_background()
    second = submit(script, requirements=requirements)
    for step in (hash_step, cache_lookup_step, build_step):
        step(ctx, second)
    with session_scope(ctx.session_factory) as session:
        row = session.get(Execution, second)
        assert row.script_cache_hit is True and row.dependency_cache_hit is True
        # Evicted right now, as the product evicts (the bytecode compile may still be writing
        # into it, so a plain rmtree could race it).
        environments.remove(ctx.settings.environments_dir, row.environment)
    run_step(ctx, second)
    store_step(ctx, second)
    with session_scope(ctx.session_factory) as session:
        assert session.get(Execution, second).status == "succeeded"
    assert stored_log(ctx, second, "stdout") == "1.0\n"
    assert "environment gone from this host" in stored_log(ctx, second, "system")


def test_another_accounts_identical_run_misses_and_gets_its_own_folder(ctx, run_script, probe):
    from rgrid.service.accounts import create_account

    requirements, module, _ = probe
    script = f"import {module}\nprint({module}.VERSION)\n"
    mine = run_script(script, requirements=requirements)
    assert mine["status"] == "succeeded", mine["error"]
    with session_scope(ctx.session_factory) as session:
        other = create_account(session, f"other-{secrets.token_hex(4)}").id
    theirs = run_script(script, requirements=requirements, account_id=other)
    assert theirs["status"] == "succeeded", theirs["error"]
    assert theirs["script_cache_hit"] is False and theirs["dependency_cache_hit"] is False
    assert theirs["deps_build_s"] is not None
    assert theirs["resolved_dependencies"] == mine["resolved_dependencies"]
    assert theirs["environment"] != mine["environment"]
    for execution in (mine, theirs):
        assert (ctx.settings.environments_dir / execution["environment"]).is_dir()
    again = run_script(script, requirements=requirements)
    assert again["script_cache_hit"] is True and again["environment"] == mine["environment"]


INLINE_EXCLUDE_NEWER = """\
# /// script
# dependencies = ["six"]
# [tool.uv]
# exclude-newer = "2021-06-01T00:00:00Z"
# ///
import six
print(six.__version__)
"""


def test_inline_tool_uv_exclude_newer_is_honoured(ctx, run_script):
    """six 1.17.0 came out in December 2024; as of June 2021 the newest was 1.16.0."""
    result = run_script(INLINE_EXCLUDE_NEWER)
    assert result["status"] == "succeeded", result["error"]
    assert result["resolved_dependencies"] == ["six==1.16.0"]
    assert stored_log(ctx, result["execution_id"], "stdout") == "1.16.0\n"


COMPILED_PROBE = (
    "import importlib.util, os, {module}\n"
    "print(os.path.exists(importlib.util.cache_from_source({module}.__file__)))\n"
)


def _compiled(ctx, environment: str) -> None:
    """Wait for the folder's background bytecode compile to finish."""
    import time

    marker = ctx.settings.environments_dir / environment / environments.COMPILED_MARKER
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "bytecode never compiled"
        time.sleep(0.2)


def test_a_new_set_imports_the_files_it_shares_with_the_accounts_earlier_sets_compiled(
    ctx, run_script, probe
):
    """A new set's first run finds compiled bytecode for the package files an earlier set of
    the same account holds (the same files, from uv's cache); another account's new set
    gets none of it."""
    from rgrid.service.accounts import create_account

    requirements, module, wheels = probe
    script = COMPILED_PROBE.format(module=module)
    first = run_script(script, requirements=requirements)
    assert first["status"] == "succeeded", first["error"]
    # The first set ever: its run imported from source; its bytecode is compiled after.
    assert stored_log(ctx, first["execution_id"], "stdout") == "False\n"
    _compiled(ctx, first["environment"])

    extra = f"rgrid-extra-{secrets.token_hex(4)}"
    make_wheel(wheels, extra, "1.0")
    second = run_script(script, requirements=f"{requirements}{extra}\n")
    assert second["status"] == "succeeded", stored_log(ctx, second["execution_id"], "stderr")
    assert second["environment"] != first["environment"]
    assert second["dependency_cache_hit"] is False
    assert stored_log(ctx, second["execution_id"], "stdout") == "True\n"
    detail = stored_log(ctx, second["execution_id"], "detail")
    assert "bytecode of 1 module(s) taken from 1 earlier environment(s)" in detail

    with session_scope(ctx.session_factory) as session:
        other = create_account(session, f"other-{secrets.token_hex(4)}").id
    theirs = run_script(script, requirements=f"{requirements}{extra}\n", account_id=other)
    assert theirs["status"] == "succeeded", theirs["error"]
    assert stored_log(ctx, theirs["execution_id"], "stdout") == "False\n"
    assert "bytecode of" not in stored_log(ctx, theirs["execution_id"], "detail")
