"""One run of bench/run.py: what its rows share (:class:`Env`: temp folders, the two CLI
modes, what to clean up), setting it up and removing everything it made, and the timed
``rgrid run`` every RGrid row is (with its checks that the run hit or missed what it should).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    BIN,
    RGRID,
    BenchError,
    Mode,
    Row,
    Sample,
    SetupError,
    clean_environ,
    compile_checkout,
    last_json_line,
    raise_for_exit,
    timed,
)
from bench.stacks import (
    BENCH_STACK_ENV,
    check_up_stack_allows_local_wheels,
    private_stack,
    remove_containers_mounting,
    up_stack_environments,
    wait_for_compile,
)
from bench.workload import (
    PAD_PACKAGE,
    PANDAS_SCRIPT,
    STDIN_SCRIPT,
    new_requirements,
    new_version,
    pad_wheel,
    start_pad_server,
    unique_script,
)
from rgrid.core import cache_keys
from scripts import stack  # `make up`'s stack (stack.up)


@dataclass
class Env:
    """Everything the rows share: temp folders, the two CLI modes, what to clean up."""

    root: Path
    embedded_env: dict[str, str]
    stack_env: dict[str, str]
    stack_kind: str
    #: The stack worker's environments folder (its data dir + environments), if known.
    stack_environments: Path | None = None
    #: The base URL of the local HTTP server that serves pad wheels (see :func:`pad_url`).
    pad_base_url: str = ""
    #: One warm script per mode, new to this benchmark run; the floors run the stack's file.
    warm_script: dict[str, Path] = field(default_factory=dict)
    #: The same for the piped-stdin section (``STDIN_SCRIPT``).
    stdin_script: dict[str, Path] = field(default_factory=dict)
    #: One requirements set per mode for the edit loop, installed by the warm-up.
    edit_requirements: dict[str, Path] = field(default_factory=dict)
    #: The edit floor's dependency folder: the same packages, installed by uv with RGrid's
    #: flags, bytecode compiled (see :func:`install_floor_deps`).
    floor_deps: Path = Path()
    #: pip's wheel, for the ``docker build`` floor's Dockerfile (the runtime image has no pip).
    pip_wheel: Path = Path()
    #: The untimed warm-up runs, kept only for their failures (reported with the table).
    warmup: Row = field(default_factory=lambda: Row("warm-up", "warm-up (untimed)"))
    made_floor_images: set[str] = field(default_factory=set)
    #: Environment folders this run's stack runs installed (removed at the end).
    made_stack_environments: set[str] = field(default_factory=set)

    @property
    def modes(self) -> list[Mode]:
        """The stack first: its rows are the headline."""
        return [
            Mode("stack", "against the stack", self.stack_env),
            Mode("embedded", "embedded default", self.embedded_env),
        ]

    @property
    def embedded_uv_cache(self) -> Path:
        """Where the embedded default keeps uv's cache (rgrid/core/config.py: data dir/uv-cache).
        The bare uv floors use it too, so both sides find the same wheels."""
        return Path(self.embedded_env["RGRID_DATA_DIR"]) / "uv-cache"


@contextmanager
def bench_env(stack_kind: str) -> Iterator[Env]:
    """Temp folders, CLI environments and the pad server; on the way out, everything made here
    (see :func:`cleanup`)."""
    compile_checkout()
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-"))
    env = Env(
        root=root,
        embedded_env={**clean_environ(), "RGRID_DATA_DIR": str(root / "embedded-data")},
        stack_env={},
        stack_kind=stack_kind,
    )
    try:
        with ExitStack() as exits:
            (root / "cwd").mkdir()  # the CLI writes ./rgrid-outputs/<id>/ under its cwd
            (root / "pad-http").mkdir()
            server, env.pad_base_url = start_pad_server(root / "pad-http")
            exits.callback(server.server_close)
            exits.callback(server.shutdown)
            for mode in ("stack", "embedded"):
                env.warm_script[mode] = unique_script(root, f"warm-{mode}")
                env.stdin_script[mode] = unique_script(root, f"stdin-{mode}", STDIN_SCRIPT)
                env.edit_requirements[mode] = new_requirements(root, f"edit-{mode}")
            env.pip_wheel = download_pip(root)
            if stack_kind == "private":
                exports = exits.enter_context(private_stack(root))
                env.stack_environments = root / "stack-data" / "environments"
            else:
                try:
                    exports = stack.up(extra_env=BENCH_STACK_ENV)
                except RuntimeError as exc:
                    raise BenchError(f"the stack did not start: {exc}") from exc
                check_up_stack_allows_local_wheels()
                env.stack_environments = up_stack_environments()
            env.stack_env = {**clean_environ(), **exports}
            yield env
    finally:
        cleanup(env)


def cleanup(env: Env) -> None:
    """Remove what this run made: the floor images; every container that mounts something
    under the temp root (the embedded default's and a private stack's warm sandboxes, bytecode
    compiles); the environment folders this run's stack runs installed, with the stack's warm
    sandboxes for them (sets nobody will run again); then the temp root. ``rgrid-runtime:*``
    is never touched, nor any other container or folder of the stack."""
    if env.made_floor_images:
        refs = sorted(env.made_floor_images)
        proc = subprocess.run(["docker", "rmi", *refs], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"cleanup: docker rmi: {proc.stderr.strip()}", file=sys.stderr)
    from rgrid.client.agent_client import stop_agents
    from rgrid.core.config import Settings

    agents = stop_agents(Settings(data_dir=Path(env.embedded_env["RGRID_DATA_DIR"])))
    doomed = [env.root]
    made = sorted(env.made_stack_environments)
    if env.stack_environments is not None and env.stack_kind == "up":
        doomed += [env.stack_environments / name for name in made]
    containers = removed_envs = 0
    try:
        containers = remove_containers_mounting(doomed)
        if env.stack_kind == "up" and env.stack_environments is not None:
            from rgrid.host import environments

            for name in made:
                if (env.stack_environments / name).is_dir():
                    environments.remove(env.stack_environments, name)
                    removed_envs += 1
    except Exception as exc:  # noqa: BLE001 - the temp root goes anyway; say what was left
        print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(env.root, ignore_errors=True)
    print(
        f"cleanup: stopped {agents} embedded agent(s), removed"
        f" {len(env.made_floor_images)} floor image(s), {containers} "
        f"container(s), {removed_envs} stack environment folder(s) and {env.root}",
        file=sys.stderr,
    )


def download_pip(root: Path) -> Path:
    """pip's wheel, once per benchmark run (untimed): the runtime image has no pip, and the
    ``docker build`` floor's Dockerfile runs pip straight from the wheel."""
    folder = root / "pip"
    pip = [str(BIN / "pip"), "download", "pip", "--no-deps", "--quiet", "-d", str(folder)]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False)
    raise_for_exit(pip, proc)
    return next(folder.glob("pip-*.whl"))


def pad_url(env: Env) -> str:
    """A new version of the pad wheel on the local HTTP server: its URL, for a PEP 723 block."""
    wheel = pad_wheel(env.root / "pad-http", new_version())
    return f"{env.pad_base_url}/{wheel.name}"


def pandas_script(env: Env, tag: str) -> Path:
    """The PEP 723 pandas script with a new pad version: a set nobody has installed before."""
    folder = env.root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(PANDAS_SCRIPT.format(pad=PAD_PACKAGE, url=pad_url(env)))
    return path


def cli_run(
    env: Env,
    mode: Mode,
    script: Path,
    *,
    requirements: Path | None = None,
    script_hit: bool | None = None,
    deps_hit: bool | None = None,
    with_deps: bool = False,
    stdin_data: str | None = None,
    reuse: bool = False,
    reused: bool | None = None,
) -> Sample:
    """One ``rgrid run --json``: wall time of the whole process and the JSON it printed.

    A run that fails, or hits a cache it should miss (or the reverse), is not a sample: its
    time would measure something else. ``deps_hit`` None: no dependencies, or (``with_deps``)
    some, hit or miss.
    After a run that installed a set, untimed: the environment folder is recorded for cleanup,
    RGrid's background bytecode compile is waited for (so it lands on no other row), and uv's
    own timings are read from the execution's stored log. ``stdin_data``: piped to the
    CLI (else its stdin is /dev/null). ``reuse``: run with ``--reuse``; ``reused``: expect the
    run to be answered from the output cache (True) or to run (False)."""
    cmd = [str(RGRID), "run", str(script), "--json"]
    if requirements is not None:
        cmd += ["-r", str(requirements)]
    if reuse:
        cmd.append("--reuse")
    elapsed, proc = timed(
        cmd, env=mode.env, cwd=env.root / "cwd", check=False, stdin_data=stdin_data
    )
    report = last_json_line(proc.stdout)
    installed = report.get("deps_build_s") is not None
    compile_wait = _settle_install(env, mode, report) if installed else None
    raise_for_exit(cmd, proc)
    _check_succeeded(mode, report, reused)
    if reused:
        return elapsed, report
    if script_hit is not None and bool(report.get("script_cache_hit")) != script_hit:
        raise BenchError(f"expected a script cache {'hit' if script_hit else 'miss'}: {report}")
    if not _check_dependencies(mode, report, deps_hit, with_deps=with_deps, installed=installed):
        return elapsed, report
    if installed:
        report = {**report, **uv_timings(mode, report["execution_id"])}
        if compile_wait is not None:
            report["compile_after_s"] = compile_wait
    return elapsed, report


def _settle_install(env: Env, mode: Mode, report: dict) -> float | None:
    """After a run that installed a set, untimed, before any check (a failed run's folder is
    cleaned up too): record the stack's environment folder for cleanup and wait for RGrid's
    background bytecode compile. Returns the seconds waited (None: no environment named)."""
    if not report.get("environment"):
        return None
    if mode.name == "stack":
        env.made_stack_environments.add(report["environment"])
    return wait_for_compile(report["environment"])


def _check_succeeded(mode: Mode, report: dict, reused: bool | None) -> None:
    """The run is RGrid of this design, succeeded with an output, and was (or was not)
    answered from the output cache as ``reused`` expects."""
    if "image_ref" in report or "environment" not in report:
        raise SetupError(
            f"the {mode.label} runs RGrid from before environments (issue 7): its --json has "
            "image_ref or lacks environment. Restart the stack (`make down && make up`) or run "
            f"the benchmark with --stack private. Report: {report}"
        )
    if report.get("status") != "succeeded" or not report.get("outputs_dir"):
        raise BenchError(f"rgrid run did not succeed with an output: {report}")
    if reused is not None and bool(report.get("reused_from")) != reused:
        raise BenchError(f"expected the run {'reused' if reused else 'to run'}: {report}")


def _check_dependencies(
    mode: Mode, report: dict, deps_hit: bool | None, *, with_deps: bool, installed: bool
) -> bool:
    """The run's dependencies are what :func:`cli_run` was told to expect. False for a run
    expected to have none (and that had none): there is no install to report on."""
    has_deps = cache_keys.has_dependencies(report.get("dependency_hash"))
    if deps_hit is None and not with_deps:
        if has_deps:
            raise BenchError(f"a script without dependencies had some: {report}")
        return False
    if not has_deps:
        raise SetupError(f"the {mode.label} ignored the script's dependencies: {report}")
    if deps_hit is not None and bool(report.get("dependency_cache_hit")) != deps_hit:
        raise BenchError(f"expected a dependency cache {'hit' if deps_hit else 'miss'}: {report}")
    if deps_hit is False and not installed:
        raise BenchError(f"a dependency cache miss that installed nothing: {report}")
    return True


#: uv's own summary lines: "Resolved 3 packages in 162ms", "Installed 3 packages in 1.02s".
_UV_TIMING = re.compile(r"\b(Resolved|Prepared|Installed) \d+ packages? in ([\d.]+)(ms|s)\b")
_UV_KEYS = {"Resolved": "uv_resolved_s", "Prepared": "uv_prepared_s", "Installed": "uv_installed_s"}


def uv_timings(mode: Mode, execution_id: str) -> dict[str, float]:
    """uv's own timings of RGrid's one install command, from the execution's stored log (the
    ``detail`` stream, which ``rgrid logs`` prints): read after the run, untimed."""
    cmd = [str(RGRID), "logs", execution_id, "--no-follow"]
    proc = subprocess.run(cmd, env=mode.env, capture_output=True, text=True, check=False)
    return parse_uv_timings(proc.stdout + proc.stderr)


def parse_uv_timings(log: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in _UV_TIMING.finditer(log):
        key = _UV_KEYS[match[1]]
        found[key] = found.get(key, 0.0) + float(match[2]) / (1000 if match[3] == "ms" else 1)
    return found
