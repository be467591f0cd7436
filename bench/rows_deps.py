"""Sections 2-5 of bench/run.py, the dependency rows: the one-line edit with the set cached,
a new requirements set (whole run, and the install against bare uv), and the first run of a
PEP 723 pandas script against ``uv run``; with their warm-ups and their floors (a ``docker
build`` that pip-installs the set, ``uv pip install``, ``uv run``, a dependency folder mounted
as RGrid mounts one).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.harness import (
    EDIT_FLOOR,
    EDIT_SANDBOX_FLOOR,
    NEW_SET_FLOOR,
    PYTHON_PLATFORM,
    PYTHON_VERSION,
    RUNTIME_IMAGE,
    SCRIPT_IN_IMAGE,
    UV,
    UV_FLOOR,
    UV_RUN_FLOOR,
    BenchError,
    Measure,
    Mode,
    Row,
    Sample,
    SetupError,
    bare_run,
    measure_with_retries,
    rgrid_row,
    rows_of,
    run_rounds,
    timed,
    uv_env,
)
from bench.session import Env, cli_run, pandas_script
from bench.workload import DEPS_SCRIPT, new_requirements, unique_script
from rgrid.host.runtimes import CONTAINER_GID, CONTAINER_UID
from rgrid.host.sandbox import DEPS_MOUNT

#: The host's CA bundle: the package index is reached through a TLS-intercepting proxy, so the
#: floor's ``pip install`` inside a build container needs it too.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Images the floors build are tagged here, so cleanup can never touch anyone else's.
FLOOR_REPOSITORY = "rgrid-bench-floor"


def edit_warm_up(env: Env, first: Row) -> None:
    """Untimed, before section 2: each mode installs its edit-loop set (the embedded one on
    its fresh data dir, so with uv's cache empty: kept in ``first`` as context), then runs one
    more edited script on it, so the timed edit loop only ever hits the dependency cache with
    the bytecode compiled and a warm sandbox waiting. This also fills each mode's uv cache with
    numpy and six, as on any host that has installed them once. Then the floor's folder."""
    row = env.warmup
    for mode in reversed(env.modes):  # the embedded default first: its uv cache is empty
        requirements = env.edit_requirements[mode.name]
        # The first run installs the set (a retry after a failed run may find it installed);
        # the second must find it.
        for hit in (None, True):
            script = unique_script(env.root, f"edit-warm-{mode.name}", DEPS_SCRIPT)
            _, report = measure_with_retries(
                row,
                lambda m=mode, s=script, r=requirements, h=hit: cli_run(
                    env, m, s, requirements=r, deps_hit=h, with_deps=True
                ),
            )
            if (
                mode.name == "embedded"
                and report.get("deps_build_s") is not None
                and not first.times
            ):
                first.times.append(report["deps_build_s"])
                first.reports.append(report)
    if not env.embedded_uv_cache.is_dir():
        raise SetupError(f"the embedded default's uv cache is not at {env.embedded_uv_cache}")
    env.floor_deps = install_floor_deps(env)
    script = unique_script(env.root, "edit-warm-floor", DEPS_SCRIPT)
    measure_with_retries(row, lambda: bare_run(script, deps=env.floor_deps))


def pep723_warm_up(env: Env) -> None:
    """Untimed, before section 5: one first run per side, which downloads pandas into each uv
    cache (the stack's, and the embedded default's that ``uv run`` shares), so that the timed
    runs find every wheel there, as on a host that has installed pandas once."""
    row = env.warmup
    for mode in env.modes:
        measure_with_retries(
            row,
            lambda m=mode: cli_run(
                env, m, pandas_script(env, f"pep723-warm-{m.name}"), deps_hit=False
            ),
        )
    measure_with_retries(row, lambda: bare_uv_run(env))


def install_floor_deps(env: Env) -> Path:
    """The edit floor's dependency folder, once (untimed): the same packages as the edit loop's
    set, installed by uv with RGrid's command line (rgrid/host/dependencies.py) from the embedded
    default's warm cache, then compiled to bytecode with the runtime's interpreter, as RGrid
    compiles its folders in the background. Without the bytecode the floor would compile numpy
    on every import (read-only mount) and flatter RGrid."""
    requirements = new_requirements(env.root, "edit-floor")
    target = requirements.parent / "deps"
    install = [str(UV), "pip", "install", "--target", str(target), "--link-mode", "hardlink"]
    install += ["--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM]
    install += ["--only-binary", ":all:", "-r", str(requirements)]
    timed(install, env=uv_env(env.embedded_uv_cache), cwd=requirements.parent)
    (target / ".lock").unlink(missing_ok=True)
    compile_ = ["docker", "run", "--rm", "--network", "none", "--user", "0:0"]
    compile_ += ["-v", f"{target}:{DEPS_MOUNT}", RUNTIME_IMAGE]
    timed([*compile_, "python3", "-m", "compileall", "-q", "-j", "0", DEPS_MOUNT])
    return target


def bare_build(env: Env, context: Path) -> tuple[float, str]:
    """``docker build`` of ``context`` on the classic builder. The tag is recorded before the
    build so that even a half-finished build gets cleaned up."""
    tag = f"{FLOOR_REPOSITORY}:{uuid.uuid4().hex[:12]}"
    env.made_floor_images.add(tag)
    build = ["docker", "build", "-q", "--force-rm", "-t", tag, str(context)]
    build_s, _ = timed(build, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return build_s, tag


def bare_deps_build_and_run(env: Env) -> Sample:
    """The new-set floor: what one would write without RGrid, a Dockerfile that pip-installs
    the same requirements.txt (a new set, as for RGrid) and copies the script, on the classic
    builder, then one run. The CA bundle and pip's wheel are the same bytes every time, so
    their layers come from Docker's cache after the first build; the requirements layer is new
    every time, and with it everything after."""
    requirements = new_requirements(env.root, "floor")
    context = requirements.parent
    wheels = context / "wheels"
    shutil.copy(CA_BUNDLE, context / "ca.crt")
    shutil.copy(env.pip_wheel, context / env.pip_wheel.name)
    script = context / "script.py"
    shutil.copy(unique_script(env.root, "floor-deps", DEPS_SCRIPT), script)
    pip = f"/tmp/{env.pip_wheel.name}/pip"
    (context / "Dockerfile").write_text(
        f"FROM {RUNTIME_IMAGE}\n"
        "USER root\n"
        "COPY ca.crt /tmp/ca.crt\n"
        f"COPY {env.pip_wheel.name} /tmp/{env.pip_wheel.name}\n"
        # The same absolute path as on the host, so the same --find-links line works.
        f"COPY wheels/ {wheels}/\n"
        "COPY requirements.txt /tmp/requirements.txt\n"
        "RUN PIP_CERT=/tmp/ca.crt SSL_CERT_FILE=/tmp/ca.crt python3 "
        f"{pip} install --no-cache-dir --break-system-packages --root-user-action=ignore "
        "--disable-pip-version-check -r /tmp/requirements.txt\n"
        f"USER {CONTAINER_UID}:{CONTAINER_GID}\n"
        f"COPY script.py {SCRIPT_IN_IMAGE}\n"
    )
    build_s, tag = bare_build(env, context)
    run_s, _ = bare_run(script, image=tag, in_image=True)
    return build_s + run_s, {"docker_build_s": build_s, "docker_run_s": run_s}


def bare_uv_install(env: Env, cache_dir: Path) -> Sample:
    """The install floor: ``uv venv`` + ``uv pip install -r`` of a new requirements set on the
    host (resolve and install; uv's defaults), with the given uv cache."""
    requirements = new_requirements(env.root, "uv")
    folder, venv = requirements.parent, requirements.parent / "venv"
    uv = uv_env(cache_dir)
    venv_s, _ = timed([str(UV), "venv", "--python", PYTHON_VERSION, str(venv)], env=uv, cwd=folder)
    install = [str(UV), "pip", "install", "--python", str(venv / "bin" / "python")]
    install_s, _ = timed([*install, "-r", str(requirements)], env=uv, cwd=folder)
    return venv_s + install_s, {"venv_s": venv_s, "uv_install_s": install_s}


def bare_uv_run(env: Env) -> Sample:
    """The PEP 723 floor: ``uv run script.py`` on the host, in the script's own folder, with
    the embedded default's (warm) uv cache. The block names a new pad version, so uv creates
    and fills a new environment every time, as RGrid installs a new set."""
    script = pandas_script(env, "uv-run")
    cmd = [str(UV), "run", "--python", PYTHON_VERSION, str(script)]
    elapsed, _ = timed(cmd, env=uv_env(env.embedded_uv_cache), cwd=script.parent)
    if not (script.parent / "outputs" / "result.txt").is_file():
        raise BenchError(f"`uv run` of {script} wrote no output")
    return elapsed, {}


def _new_deps_script(
    env: Env, mode: Mode, tag: str, requirements: Callable[[Mode], Path], deps_hit: bool
) -> Measure:
    """A measure that runs a new copy of DEPS_SCRIPT (a script cache miss every time) with
    ``requirements(mode)``, by ``mode``."""

    def measure() -> Sample:
        script = unique_script(env.root, f"{tag}-{mode.name}", DEPS_SCRIPT)
        return cli_run(
            env,
            mode,
            script,
            requirements=requirements(mode),
            script_hit=False,
            deps_hit=deps_hit,
        )

    return measure


def edit_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 2: numpy + six cached, the script changed by one line every run; the floor runs
    the same kind of new script with the same packages mounted the same way."""

    def floor(sandboxed: bool) -> Measure:
        def measure() -> Sample:
            script = unique_script(env.root, "edit-floor", DEPS_SCRIPT)
            return bare_run(script, deps=env.floor_deps, sandboxed=sandboxed)

        return measure

    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                EDIT_FLOOR,
                f"floor: `docker run --rm --network none -v DEPS:{DEPS_MOUNT}:ro "
                f"-e PYTHONPATH={DEPS_MOUNT}`, new script",
                EDIT_FLOOR,
            ),
            floor(False),
        ),
        (
            Row(
                EDIT_SANDBOX_FLOOR, "floor + RGrid's sandbox flags", EDIT_FLOOR, EDIT_SANDBOX_FLOOR
            ),
            floor(True),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run -r` edited script, {mode.label}"
        row = rgrid_row(f"edit-{mode.name}", label, EDIT_FLOOR, EDIT_SANDBOX_FLOOR)
        edited = _new_deps_script(env, mode, "edit", lambda m: env.edit_requirements[m.name], True)
        rows.append((row, edited))
    return rows


def new_set_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 3 (a new requirements set every time), and section 4's bare uv row, timed in
    the same rounds so that they see the same machine."""

    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                NEW_SET_FLOOR,
                "floor: `DOCKER_BUILDKIT=0 docker build` (`RUN pip install -r "
                "requirements.txt`) + `docker run`",
                NEW_SET_FLOOR,
            ),
            lambda: bare_deps_build_and_run(env),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run -r` new requirements, {mode.label}"
        new_set = _new_deps_script(
            env, mode, "new-set", lambda m: new_requirements(env.root, f"new-set-{m.name}"), False
        )
        rows.append((rgrid_row(f"new-set-{mode.name}", label, NEW_SET_FLOOR), new_set))
    rows.append(
        (
            Row(
                UV_FLOOR,
                "floor: `uv venv` + `uv pip install -r` on the host, uv cache warm",
                UV_FLOOR,
            ),
            lambda: bare_uv_install(env, env.embedded_uv_cache),
        )
    )
    return rows


def install_rows(env: Env, new_set: list[Row], first: Row, uv_cold: Row) -> list[Row]:
    """Section 4: RGrid's ``deps_build_s`` from section 3's runs next to section 3's bare uv
    row, with uv's own timings from each run's log; then the cold-cache context rows."""
    by_key = {row.key: row for row in new_set}
    rows = [by_key[UV_FLOOR]]
    for mode in env.modes:
        source = by_key.get(f"new-set-{mode.name}")
        if source is None:
            continue
        key = f"install-{mode.name}"
        row = rgrid_row(key, f"RGrid `deps_build_s`, {mode.label}", UV_FLOOR)
        row.times = [r["deps_build_s"] for r in source.reports]
        row.reports = [{k: v for k, v in r.items() if k.startswith("uv_")} for r in source.reports]
        rows.append(row)
    return [*rows, *(row for row in (uv_cold, first) if row.times)]


def pep723_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 5: the first run of a PEP 723 pandas script (a new set every time, for both)."""
    rows: list[tuple[Row, Measure]] = [
        (
            Row(UV_RUN_FLOOR, "floor: `uv run script.py` on the host, uv cache warm", UV_RUN_FLOOR),
            lambda: bare_uv_run(env),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run` PEP 723 script, first run, {mode.label}"
        rows.append(
            (
                rgrid_row(f"pep723-{mode.name}", label, UV_RUN_FLOOR),
                lambda m=mode: cli_run(
                    env, m, pandas_script(env, f"pep723-{m.name}"), script_hit=False, deps_hit=False
                ),
            )
        )
    return rows


def context_rows() -> tuple[Row, Row]:
    """Section 4's two context rows, timed once each: RGrid's first install on a fresh data
    dir (taken from :func:`edit_warm_up`) and bare uv with an empty cache (after section 3)."""
    first = Row(
        "deps-first",
        "context: RGrid `deps_build_s`, first install on a fresh data dir (uv cache empty), once",
        floor=UV_FLOOR,
    )
    uv_cold = Row(
        "uv-cold",
        "context: `uv venv` + `uv pip install -r`, empty uv cache, once",
        floor=UV_FLOOR,
    )
    return first, uv_cold


def edit_section(env: Env, repeat: int) -> list[tuple[str, list[Row]]]:
    """Section 2 in its own rounds (after :func:`edit_warm_up`)."""
    edit = edit_rows(env)
    run_rounds(edit, repeat, "edit loop")
    return [
        (
            "2. One-line edit, dependencies cached (numpy + six; a new script every run)",
            rows_of(edit),
        )
    ]


def new_set_section(env: Env, repeat: int, first: Row, uv_cold: Row) -> list[tuple[str, list[Row]]]:
    """Sections 3 and 4 from the same rounds (after :func:`edit_warm_up`, which filled
    ``first``), then the cold-cache uv row once."""
    new_set = new_set_rows(env)
    run_rounds(new_set, repeat, "new requirements set")
    cold_cache = env.root / f"uv-cold-cache-{uuid.uuid4().hex[:8]}"
    elapsed, report = measure_with_retries(uv_cold, lambda: bare_uv_install(env, cold_cache))
    uv_cold.times.append(elapsed)
    uv_cold.reports.append(report)
    first.reports = [{k: v for k, v in r.items() if k.startswith("uv_")} for r in first.reports]
    return [
        (
            "3. New requirements set (numpy + six + a new pad version): whole run",
            [row for row in rows_of(new_set) if row.key != UV_FLOOR],
        ),
        (
            "4. Dependency install for a new set: RGrid vs bare uv (RGrid rows "
            "from section 3's runs)",
            install_rows(env, rows_of(new_set), first, uv_cold),
        ),
    ]


def pep723_section(env: Env, repeat: int) -> list[tuple[str, list[Row]]]:
    """Section 5: its warm-up, then its own rounds."""
    print("warming up for PEP 723 (pandas)…", file=sys.stderr)
    pep723_warm_up(env)
    pep723 = pep723_rows(env)
    run_rounds(pep723, repeat, "PEP 723 first run")
    return [
        (
            "5. First run of a pandas script with a PEP 723 block (a new set every run, for both)",
            rows_of(pep723),
        )
    ]
