"""The shared harness of the benchmarks: where the checkout's tools are, the runtime the
floors use, timing whole processes, rows timed in interleaved rounds with their medians and
ratios, the table they print, and the bare floors (``docker run``, uv with RGrid's settings)
that every bench compares against. bench/run.py and the other bench scripts import it.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rgrid.core.config import DEFAULT_RUNTIME, Settings
from rgrid.host.runtimes import CONTAINER_GID, CONTAINER_UID, WORK_DIR, resolve_runtime
from rgrid.host.sandbox import DEPS_MOUNT
from rgrid.host.sandbox_run import thread_environment

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
RGRID = BIN / "rgrid"
UV = BIN / "uv"
#: The runtime every row runs on; the floors use its image, interpreter and platform (their
#: dependency folder is installed for them exactly as RGrid installs its own), its work folder
#: (where RGrid's sandbox has the script too) and its uid (the floors' output folders must be
#: writable by it). The edit floor mounts its dependency set where RGrid mounts one.
RUNTIME = resolve_runtime(DEFAULT_RUNTIME)
RUNTIME_IMAGE = RUNTIME.image
PYTHON_VERSION = RUNTIME.python_version
PYTHON_PLATFORM = RUNTIME.python_platform
SCRIPT_IN_WORK = f"{WORK_DIR}/script.py"
#: Where the ``docker build`` floor COPYs the script (it is part of that image).
SCRIPT_IN_IMAGE = "/app/script.py"
#: Longest any one measured command may take (the ``docker build`` floor takes ~30 s here).
COMMAND_TIMEOUT_S = 900
#: RGrid's sandbox (rgrid/host/sandbox.py, with the default limits of rgrid/core/config.py)
#: as ``docker run`` flags, for the "+ sandbox flags" floors: read-only root, /tmp tmpfs, the
#: runtime's user, no capabilities, no new privileges, the memory/CPU/PID limits, no network,
#: and the thread counts that fit the CPU limit. (RGrid's home tmpfs is left out: the scripts
#: never write there.)
_LIMITS = Settings()
SANDBOX_FLAGS = [
    *(f"-e{name}={value}" for name, value in thread_environment(_LIMITS.cpu_limit).items()),
    "--read-only",
    *("--tmpfs", "/tmp"),
    *("--user", f"{CONTAINER_UID}:{CONTAINER_GID}"),
    *("--cap-drop", "ALL"),
    *("--security-opt", "no-new-privileges"),
    *("--memory", _LIMITS.memory_limit, "--memory-swap", _LIMITS.memory_limit),
    *("--cpus", f"{_LIMITS.cpu_limit:g}", "--pids-limit", str(_LIMITS.pids_limit)),
    *("--network", "none"),
]


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed); the numbers would mean nothing."""


class SetupError(BenchError):
    """Retrying cannot help (for example, the stack runs code from before environments)."""


@dataclass
class Row:
    """One line of the table: a way of running the script, timed once per round."""

    key: str
    label: str
    #: The keys of the rows this one is divided by (the ratio columns), if any.
    floor: str | None = None
    sandbox_floor: str | None = None
    #: Issue 7's target for this row's ratio to its floor, shown beside it.
    target: str = ""
    times: list[float] = field(default_factory=list)
    #: What rgrid itself reported for each run (--json), to show where the wall time goes.
    reports: list[dict] = field(default_factory=list)
    #: Runs that failed and were retried (their time is not in ``times``), one line each.
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass(frozen=True)
class Mode:
    """A way the CLI runs: against the stack, or the embedded default."""

    name: str  # "stack" or "embedded"
    label: str  # "against the stack" / "embedded default"
    env: dict[str, str]


#: A measurement: wall seconds and whatever timings the measured thing reported about itself.
Sample = tuple[float, dict]
Measure = Callable[[], Sample]
#: Attempts per sample before the benchmark gives up (see :func:`measure_with_retries`).
MAX_ATTEMPTS = 3


def timed(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    stdin_data: str | None = None,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion and return (seconds, completed process). Output is captured
    rather than shown, so terminal speed is not part of the measurement. A command that hangs
    for ``COMMAND_TIMEOUT_S`` is a failed run, not a benchmark that never ends. Its stdin is
    ``stdin_data`` piped in, else /dev/null: never the benchmark's own stdin, which would make
    every row's path depend on how the benchmark was started (a terminal or a pipe)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            input=stdin_data,
            stdin=subprocess.DEVNULL if stdin_data is None else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"`{shlex.join(cmd)}` still running after {COMMAND_TIMEOUT_S}s") from exc
    elapsed = time.perf_counter() - started
    if check:
        raise_for_exit(cmd, proc)
    return elapsed, proc


def raise_for_exit(cmd: list[str], proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BenchError(f"`{shlex.join(cmd)}` exited {proc.returncode}:\n{tail}")


def output_of(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Stdout of a quick helper command (not timed)."""
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def docker_server_version() -> str:
    return output_of(["docker", "version", "--format", "{{.Server.Version}}"])


@functools.cache
def docker_client():
    """docker-py, for untimed bookkeeping only (waiting for RGrid's background work, cleanup):
    every timed Docker command goes through the docker CLI, as a user would type it."""
    import docker

    return docker.from_env(timeout=120)


def compile_checkout() -> None:
    """The checkout's bytecode, compiled once, as installing RGrid's wheel compiles it. An
    editable checkout run with PYTHONDONTWRITEBYTECODE (set on this workplace's machines)
    never writes it, and every CLI start then compiled rgrid's modules from source: 0.13 s of
    a 0.29 s `rgrid run --reuse` (cProfile: 28 calls of ``compile``), a cost of the
    checkout, not of what users install. ``make setup`` compiles it too."""
    for package in ("rgrid", "workers", "migrations"):
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(REPO / package)],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def clean_environ() -> dict[str, str]:
    """The caller's environment without RGRID_*: each row states its own configuration, so a
    stray RGRID_API_URL in the shell cannot turn the embedded row into a stack row."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RGRID_")}


def last_json_line(stdout: str) -> dict:
    """``--json`` prints one object as the last line of stdout; {} if there is none (a crash)."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def run_rounds(cases: list[tuple[Row, Measure]], repeat: int, title: str) -> None:
    """``repeat`` rounds, each timing every case once; the order rotates by one each round so
    that no row always follows (or precedes) the same other row."""
    for i in range(repeat):
        shift = i % len(cases)
        for row, measure in cases[shift:] + cases[:shift]:
            elapsed, report = measure_with_retries(row, measure)
            row.times.append(elapsed)
            row.reports.append(report)
        print(f"  {title}: round {i + 1}/{repeat} done", file=sys.stderr)


def measure_with_retries(row: Row, measure: Measure) -> Sample:
    """One sample; a failed run is retried (and reported with the table) rather than ending the
    benchmark: on a shared Docker host, someone else's reaper or test can kill a container."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return measure()
        except SetupError:
            raise
        except BenchError as exc:
            row.failures.append(str(exc).strip().splitlines()[-1])
            print(f"  {row.key}: run failed (attempt {attempt}): {exc}", file=sys.stderr)
    raise BenchError(f"{row.label}: {MAX_ATTEMPTS} attempts in a row failed")


def rows_of(cases: list[tuple[Row, Measure]]) -> list[Row]:
    return [row for row, _ in cases]


#: Self-reported timings shown in the last column, in this order: (report key, label).
OWN_TIMINGS = (
    ("docker_build_s", "docker build"),
    ("docker_run_s", "docker run"),
    ("venv_s", "uv venv"),
    ("uv_install_s", "uv pip install"),
    ("uv_resolved_s", "uv: resolved"),
    ("uv_prepared_s", "uv: prepared"),
    ("uv_installed_s", "uv: installed"),
    ("deps_build_s", "deps"),
    ("run_s", "run"),
    ("duration_s", "pipeline"),
    ("compile_after_s", "bytecode compile left after exit"),
)


def _median_of(row: Row, name: str) -> float | None:
    values = [r[name] for r in row.reports if isinstance(r.get(name), int | float)]
    return statistics.median(values) if values else None


def own_timings(row: Row) -> str:
    """What rgrid (or the bare commands) said about itself, how many runs found a warm
    sandbox, and the wall time outside the pipeline: process start, imports, submission,
    polling, the download, exit."""
    parts = []
    for name, label in OWN_TIMINGS:
        value = _median_of(row, name)
        if value is not None:
            parts.append(f"{label} {value:.2f}")
    durations = [r.get("duration_s") for r in row.reports]
    if durations and all(isinstance(d, int | float) for d in durations):
        outside = statistics.median(t - d for t, d in zip(row.times, durations, strict=True))
        parts.append(f"**outside pipeline {outside:.2f}**")
    warm = [r["sandbox_warm"] for r in row.reports if "sandbox_warm" in r]
    if warm:
        parts.append(f"warm sandbox {sum(1 for w in warm if w)}/{len(warm)}")
    if row.failures:
        parts.append(f"⚠ {len(row.failures)} failed run(s) retried")
    return ", ".join(parts)


def failure_notes(rows: list[Row]) -> str:
    """The failed (and retried) runs under the table: a number with a hidden retry is a lie."""
    lines = [f"- {row.label}: {msg}" for row in rows for msg in row.failures]
    return "Failed runs (retried, not timed):\n\n" + "\n".join(lines) if lines else ""


def ratio(row: Row, floor: Row | None) -> str:
    if floor is None or not floor.times or not row.times:
        return ""
    return f"{row.median / floor.median:.2f}×"


def table(sections: list[tuple[str, list[Row]]]) -> str:
    """Markdown: median and min per row, median ÷ floor median (and issue 7's target for it),
    median ÷ the sandboxed floor's median, rgrid's own timings. A floor is looked up in the
    row's own section first: sections 1 and 1c each time a warm floor of the same key, and a
    row is divided by the floor timed in its own rounds."""
    lines = [
        "| row | median s | min s | ÷ floor | target | ÷ sandboxed floor | own timings, median s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    every = {row.key: row for _, rows in sections for row in rows}
    for title, rows in sections:
        lines.append(f"| **{title}** | | | | | | |")
        by_key = {**every, **{row.key: row for row in rows}}
        for row in rows:
            floor = by_key.get(row.floor) if row.floor else None
            sandbox = by_key.get(row.sandbox_floor) if row.sandbox_floor else None
            lines.append(
                f"| {row.label} | {row.median:.3f} | {row.best:.3f} | {ratio(row, floor)} "
                f"| {row.target} | {ratio(row, sandbox)} | {own_timings(row)} |"
            )
    return "\n".join(lines)


def median_row(label: str, times: list[float], floor_median: float, note: str = "") -> str:
    """A markdown row of the smaller benches' tables: median and min (3 decimals), median ÷
    the floor's median, and a note (blank when none)."""
    median = statistics.median(times)
    return f"| {label} | {median:.3f} | {min(times):.3f} | {median / floor_median:.2f}× |" + (
        f" {note} |" if note else " |"
    )


def say(text: str) -> None:
    """A progress line, flushed at once (the benches print while they run)."""
    print(text, flush=True)


# --- in-process lookups (bench/cache_lookup.py, bench/reuse_lookup.py) ----------------------


def p50_p99(samples: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile of sorted ``samples``."""
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def seed_table(url: str, table: str, statements: list[tuple[str, dict]]) -> float:
    """Seconds to run the seeding ``statements`` (SQL, parameters) in autocommit on the
    scratch database ``url``, then analyze ``table``. Its autovacuum is turned off after: an
    autovacuum worker still in the database at the end would keep it from being dropped
    (DROP ... WITH (FORCE) may not end a superuser's process)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.monotonic()
    with engine.connect() as conn:
        for sql, params in statements:
            conn.execute(text(sql), params)
        conn.execute(text(f"VACUUM ANALYZE {table}"))
        conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    engine.dispose()
    return time.monotonic() - started


def interleaved_ms(fns: list[Callable[[int], object]], keys: list[int]) -> list[list[float]]:
    """Each function on each key, interleaved (floor, rgrid, floor, ...), so that a busy
    moment of the machine falls on both alike; sorted samples per function, in ms."""
    for g in keys[:200]:  # warm the connections, the plan cache and the pages
        for fn in fns:
            fn(g)
    samples: list[list[float]] = [[] for _ in fns]
    for g in keys:
        for fn, out in zip(fns, samples, strict=True):
            started = time.perf_counter()
            fn(g)
            out.append((time.perf_counter() - started) * 1000)
    return [sorted(out) for out in samples]


def report_ms(name: str, samples: list[float], floor: list[float] | None = None) -> None:
    """One line of the lookup benches: p50 and p99 in ms, and their ratios to the floor's."""
    p50, p99 = p50_p99(samples)
    line = f"{name:44} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
    if floor:
        f50, f99 = p50_p99(floor)
        line += f"  ({p50 / f50:.1f}x / {p99 / f99:.1f}x the floor)"
    print(line, flush=True)


def writable_outputs(folder: Path) -> Path:
    """An ``outputs`` folder the runtime image's user can write, for a floor's bind mount."""
    outputs = folder / "outputs"
    outputs.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(outputs, CONTAINER_UID, CONTAINER_GID)
    else:
        outputs.chmod(0o777)
    return outputs


def bare_run(
    script: Path,
    *,
    image: str = RUNTIME_IMAGE,
    deps: Path | None = None,
    sandboxed: bool = False,
    in_image: bool = False,
    stdin_data: str | None = None,
) -> Sample:
    """The floor: ``docker run --rm --network none`` of the runtime image with the script
    bind-mounted read-only at /work/script.py and a writable /work/outputs (RGrid's sandbox has
    both at the same paths), optionally with a dependency folder mounted read-only at RGrid's
    path and put on PYTHONPATH, as RGrid does. ``in_image``: the script is already in the image
    (the ``docker build`` floor), so only the outputs folder is mounted. ``stdin_data``:
    piped in, with ``docker run -i`` (else stdin is /dev/null and not attached)."""
    flags = SANDBOX_FLAGS if sandboxed else ["--network", "none"]
    if stdin_data is not None:
        flags = ["-i", *flags]
    mounts = ["-v", f"{writable_outputs(script.parent)}:{WORK_DIR}/outputs"]
    if not in_image:
        mounts += ["-v", f"{script}:{SCRIPT_IN_WORK}:ro"]
    if deps is not None:
        mounts += ["-v", f"{deps}:{DEPS_MOUNT}:ro", "-e", f"PYTHONPATH={DEPS_MOUNT}"]
    target = SCRIPT_IN_IMAGE if in_image else SCRIPT_IN_WORK
    elapsed, _ = timed(
        ["docker", "run", "--rm", *flags, *mounts, image, "python3", target], stdin_data=stdin_data
    )
    return elapsed, {}


@functools.cache
def rgrid_uv_settings() -> dict[str, str]:
    """The settings RGrid gives uv (the host's pip configuration translated,
    rgrid/host/dependencies.py): the bare uv floors get exactly the same."""
    from rgrid.host.dependencies import uv_environment

    return dict(uv_environment())


def uv_env(cache_dir: Path) -> dict[str, str]:
    return {
        **clean_environ(),
        **rgrid_uv_settings(),
        "UV_CACHE_DIR": str(cache_dir),
        "NO_COLOR": "1",
    }


#: The floor rows' keys: what the rows' ratio columns divide by.
FLOOR = "warm-floor"
SANDBOX_FLOOR = "warm-sandbox-floor"
EDIT_FLOOR = "edit-floor"
EDIT_SANDBOX_FLOOR = "edit-sandbox-floor"
NEW_SET_FLOOR = "new-set-floor"
UV_FLOOR = "uv-floor"
UV_RUN_FLOOR = "uv-run-floor"
STDIN_FLOOR = "stdin-floor"

#: Issue 7's targets (ratio of the median to the floor's median), by row key.
TARGETS = {
    "warm-stack": "≤ 1.0×",
    "warm-embedded": "≤ 1.2×",
    "stdin-embedded": "≤ 1.2×",
    "reuse-stack": "≤ 0.5×",
    "reuse-embedded": "≤ 0.5×",
    "edit-stack": "≤ 1.1×",
    "new-set-stack": "≤ 0.1×",
    "install-stack": "≤ 1.5×",
    "pep723-stack": "≤ 1.5×",
}


def rgrid_row(key: str, label: str, floor: str, sandbox_floor: str | None = None) -> Row:
    return Row(key, label, floor=floor, sandbox_floor=sandbox_floor, target=TARGETS.get(key, ""))
