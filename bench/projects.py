"""Projects benchmark (issue 22): a one-line edit of one helper module in a 30-module project.

Rows, timed in interleaved rounds (order rotated), median and minimum, ratios against the floor:
- floor: `docker run --rm --network none -v PROJECT:/work:ro -w /work rgrid-runtime:python-3.11
  python3 /work/main.py`, the same project bind-mounted into the same image;
- `rgrid run main.py --json` embedded and against a private stack (bench/stacks.py's
  `private_stack`), each round after a one-line edit of `helpers/m07.py`;
- bytes sent: a repeat of an unchanged tree, and one module of 30 changed.

Then the first run of a ``uv.lock`` project (pyproject.toml + a lock made with ``uv lock`` at
bench time, pinning pandas), uv cache warm, against ``uv run main.py`` of the same project:
- floor: ``uv run main.py`` into a new project environment (``UV_PROJECT_ENVIRONMENT``);
- ``rgrid run main.py --json``, embedded and against the stack, which have not built that
  environment yet.
Every round adds a new tiny local wheel to the project's dependencies (and locks again,
untimed), so each side installs a new set: a first run for RGrid's environment cache as for
uv. One uv cache serves all three (``UV_CACHE_DIR`` / ``RGRID_UV_CACHE_DIR``), warmed by an
untimed run of each, so both sides find pandas' wheels there.

    .venv/bin/python bench/projects.py --repeat 3 --lock-repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.harness import (  # noqa: E402
    PYTHON_VERSION,
    RGRID,
    RUNTIME_IMAGE,
    UV,
    clean_environ,
    compile_checkout,
    median_row,
    timed,
    uv_env,
)
from bench.stacks import BENCH_STACK_ENV, private_stack, remove_containers_mounting  # noqa: E402
from tests.wheels import make_wheel  # noqa: E402

MODULES = 30


def make_project(root: Path) -> Path:
    """A project: pyproject.toml, main.py, a package of 30 helper modules (relative imports)."""
    project = root / "project"
    helpers = project / "helpers"
    helpers.mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "bench"\nversion = "0"\n')
    imports = "".join(f"from . import m{i:02d}\n" for i in range(MODULES))
    (helpers / "__init__.py").write_text(imports)
    for i in range(MODULES):
        body = "".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(20))
        (helpers / f"m{i:02d}.py").write_text(f"VALUE = {i}\n\n{body}")
    total = " + ".join(f"helpers.m{i:02d}.VALUE" for i in range(MODULES))
    (project / "main.py").write_text(f"import helpers\nprint('total', {total})\n")
    return project


def edit(project: Path, counter: int) -> int:
    """One line of one helper changed; returns the module's new size."""
    module = project / "helpers" / "m07.py"
    lines = module.read_text().splitlines()
    lines[0] = f"VALUE = 7  # edit {counter} {time.time_ns()}"
    module.write_text("\n".join(lines) + "\n")
    return module.stat().st_size


def rgrid_json(env: dict, project: Path) -> tuple[float, dict]:
    elapsed, proc = timed([str(RGRID), "run", "main.py", "--json"], env=env, cwd=project)
    return elapsed, json.loads(proc.stdout.strip().splitlines()[-1])


LOCKED_MAIN = "import pandas as pd\nprint('rows', len(pd.DataFrame({'a': [1, 2, 3]})))\n"


def lock_project(root: Path, wheels: Path, salt: str) -> Path:
    """The pandas project with one more tiny dependency (``salt``), locked again (untimed)."""
    project = root / "locked"
    project.mkdir(exist_ok=True)
    make_wheel(wheels, salt, "1.0")
    (project / "main.py").write_text(LOCKED_MAIN)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "locked"\nversion = "0"\n'
        f'requires-python = ">={PYTHON_VERSION}"\ndependencies = ["pandas", "{salt}"]\n\n'
        f"[tool.uv]\nfind-links = [{str(wheels)!r}]\n"
    )
    uv = uv_env(root / "uv-cache")
    locked = subprocess.run(
        [str(UV), "lock", "--python", PYTHON_VERSION, "--quiet"],
        cwd=project,
        env=uv,
        capture_output=True,
        text=True,
    )
    if locked.returncode != 0:
        raise SystemExit(f"uv lock failed: {locked.stderr[-500:]}")
    return project


def uv_run(root: Path, project: Path, name: str) -> float:
    """``uv run main.py`` into a project environment of its own: uv creates and fills it."""
    env = {**uv_env(root / "uv-cache"), "UV_PROJECT_ENVIRONMENT": str(root / "venvs" / name)}
    cmd = [str(UV), "run", "--locked", "--python", PYTHON_VERSION, "main.py"]
    elapsed, _ = timed(cmd, env=env, cwd=project)
    return elapsed


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lock-repeat", type=int, default=3)
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="Do not compile the checkout's bytecode first (see compile_checkout).",
    )
    return parser.parse_args()


def main() -> None:
    options = parse_options()
    if not options.no_bytecode:
        compile_checkout()
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-projects-"))
    try:
        with ExitStack() as exits:
            project = make_project(root)
            modes = project_modes(root, exits)
            edit_rows(project, modes, options.repeat)
            if options.lock_repeat:
                lock_rows(root, modes, options.lock_repeat)
            # The embedded default's agent serves this data folder: end it with the folder.
            subprocess.run(
                [str(RGRID), "agent", "stop"], env=modes["embedded"], capture_output=True
            )
            remove_containers_mounting([root])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def project_modes(root: Path, exits: ExitStack) -> dict[str, dict]:
    """The CLI's environment per mode: the embedded default on a data folder under ``root``,
    and a private stack (ended by ``exits``); both share one uv cache."""
    shared_uv = {"RGRID_UV_CACHE_DIR": str(root / "uv-cache")}
    stack_env = {**BENCH_STACK_ENV, **shared_uv}
    return {
        "embedded": {
            **clean_environ(),
            "RGRID_DATA_DIR": str(root / "embedded-data"),
            **shared_uv,
        },
        "stack": {**clean_environ(), **exits.enter_context(private_stack(root, stack_env))},
    }


def edit_rows(project: Path, modes: dict[str, dict], repeat: int) -> None:
    """A one-line helper edit per run, in rotated rounds against a bare ``docker run`` of the
    project; then the table, with the bytes each run sent."""
    floor = ["docker", "run", "--rm", "--network", "none", "-v", f"{project}:/work:ro"]
    floor += ["-w", "/work", RUNTIME_IMAGE, "python3", "/work/main.py"]
    times: dict[str, list[float]] = {"floor": [], "embedded": [], "stack": []}
    sent: dict[str, list[tuple[int, int]]] = {"embedded": [], "stack": []}
    repeat_bytes: dict[str, int] = {}
    for name, env in modes.items():  # untimed warm-up; then an unchanged repeat
        rgrid_json(env, project)
        repeat_bytes[name] = rgrid_json(env, project)[1]["bytes_uploaded"]
    timed(floor, cwd=project)
    counter = 0
    for round_ in range(repeat):
        order = ["floor", "embedded", "stack"]
        order = order[round_ % 3 :] + order[: round_ % 3]
        for name in order:
            counter += 1
            size = edit(project, counter)
            if name == "floor":
                times[name].append(timed(floor, cwd=project)[0])
                continue
            elapsed, execution = rgrid_json(modes[name], project)
            assert execution["status"] == "succeeded", execution
            times[name].append(elapsed)
            sent[name].append((execution["bytes_uploaded"], size))
    floor_median = statistics.median(times["floor"])
    print("| row | median s | min s | ÷ floor | bytes sent (repeat / one module) |")
    print("| --- | --- | --- | --- | --- |")
    print(median_row("floor: docker run, project bind-mounted", times["floor"], floor_median))
    for name in ("stack", "embedded"):
        pairs = ", ".join(f"{b} of {s}" for b, s in sent[name])
        label = f"`rgrid run`, one-line helper edit, {name}"
        note = f"{repeat_bytes[name]} B / {pairs} B"
        print(median_row(label, times[name], floor_median, note))


def lock_rows(root: Path, modes: dict[str, dict], repeat: int) -> None:
    """The first run of a uv.lock project (pandas), uv cache warm, against ``uv run``."""
    wheels = root / "salt-wheels"
    wheels.mkdir()
    counter = 0

    def fresh() -> Path:
        nonlocal counter
        counter += 1
        return lock_project(root, wheels, f"rgrid-bench-salt-{counter}")

    # Untimed: each side downloads pandas' wheels into the shared uv cache once.
    project = fresh()
    uv_run(root, project, "warm-up")
    for env in modes.values():
        _, execution = rgrid_json(env, project)
        assert execution["status"] == "succeeded", execution
    times: dict[str, list[float]] = {"floor": [], "embedded": [], "stack": []}
    builds: dict[str, list[float]] = {"embedded": [], "stack": []}
    for round_ in range(repeat):
        order = ["floor", "embedded", "stack"]
        for name in order[round_ % 3 :] + order[: round_ % 3]:
            project = fresh()
            if name == "floor":
                times[name].append(uv_run(root, project, f"round-{counter}"))
                continue
            elapsed, execution = rgrid_json(modes[name], project)
            assert execution["status"] == "succeeded", execution
            assert execution["dependency_source"] == "uv.lock", execution
            assert execution["dependency_cache_hit"] is False, execution
            times[name].append(elapsed)
            builds[name].append(execution.get("deps_build_s") or 0.0)
    floor_median = statistics.median(times["floor"])
    print()
    print("| row | median s | min s | ÷ floor | RGrid's install (deps_build_s) |")
    print("| --- | --- | --- | --- | --- |")
    label = "floor: `uv run main.py`, new project environment, uv cache warm"
    print(median_row(label, times["floor"], floor_median))
    for name in ("stack", "embedded"):
        label = f"`rgrid run main.py`, uv.lock project (pandas), first run, {name}"
        note = f"{statistics.median(builds[name]):.2f} s"
        print(median_row(label, times[name], floor_median, note))


if __name__ == "__main__":
    main()
