"""RGrid benchmark: what a run costs through the CLI, next to the bare Docker floor beneath it.

DESIGN.md sets the bar: a warm run costs little more than a bare ``docker run`` of the same image,
and editing one line of a script costs about as much. This measures both, in one invocation, as
ratios against the floor; nothing here passes or fails. Every measurement is the wall time of a
whole process (``time.perf_counter`` around ``subprocess.run``), because that is what a user
waits for: interpreter start, imports, submission, the container, the summary, the download.

Repetitions are interleaved (each round runs every row once, in a rotated order) so that a slow
spell on a shared machine spreads over all rows instead of landing on one.

Run with ``make bench`` or ``.venv/bin/python bench/run.py [--repeat N]``. Needs the runtime
image (``make setup``) and the local services; the stack itself is started by ``scripts/up.sh``,
which is idempotent. Every image, container and temporary directory made here is removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RGRID = REPO / ".venv" / "bin" / "rgrid"
UP_SCRIPT = REPO / "scripts" / "up.sh"
RESULTS_FILE = REPO / "bench" / "results" / "latest.md"

RUNTIME_IMAGE = "rgrid-runtime:python-3.11"
EXEC_REPOSITORY = "rgrid-exec"
#: Images the cold floor builds are tagged here, so cleanup can never touch anyone else's.
FLOOR_REPOSITORY = "rgrid-bench-floor"
SCRIPT_PATH = "/app/script.py"

#: The sandbox RGrid applies (rgrid/runner.py), minus the cgroup limits. ``-v /work`` is an
#: anonymous volume (removed with ``--rm``) standing in for RGrid's per-execution volume: with a
#: read-only root the script could not write its output file anywhere else.
SANDBOX_FLAGS = [
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--user",
    "1000:1000",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--network",
    "none",
    "-v",
    "/work",
]

#: The small script: one line on stdout, one file under /work/outputs. It creates the folder
#: itself because the bare floor runs have no RGrid skeleton in /work.
SCRIPT = """\
import os

print("hello from the rgrid benchmark")
os.makedirs("/work/outputs", exist_ok=True)
with open("/work/outputs/result.txt", "w") as fh:
    fh.write("ok\\n")
"""

DOCKERFILE = f"FROM {RUNTIME_IMAGE}\nCOPY script.py {SCRIPT_PATH}\n"


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed); the numbers would mean nothing."""


@dataclass
class Row:
    """One line of the table: a way of running the script, timed once per round."""

    key: str
    label: str
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


@dataclass
class Env:
    """Everything the rows share: temp folders, the two CLI environments, images to remove."""

    root: Path
    embedded_env: dict[str, str]
    stack_env: dict[str, str]
    #: One warm script per mode, each new to this benchmark run (see :func:`warm_up`).
    warm_embedded: Path = Path()
    warm_stack: Path = Path()
    warm_image: str = ""
    #: The untimed warm-up runs, kept only for their failures (reported with the table).
    warmup: Row = field(default_factory=lambda: Row("warm-up", "warm-up (untimed)"))
    preexisting_exec_tags: set[str] = field(default_factory=set)
    made_exec_images: set[str] = field(default_factory=set)
    made_floor_images: set[str] = field(default_factory=set)


# --- processes ------------------------------------------------------------------------------


def timed(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion and return (seconds, completed process). Output is captured
    rather than shown, so terminal speed is not part of the measurement."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
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


def exec_tags() -> set[str]:
    """Every rgrid-exec image present now, so cleanup removes only the ones this run made."""
    out = output_of(["docker", "images", EXEC_REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}"])
    return set(out.split())


# --- environments ---------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The caller's environment without RGRID_*: each row states its own configuration, so a
    stray RGRID_API_URL in the shell cannot turn the embedded row into a stack row."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RGRID_")}


def stack_exports() -> dict[str, str]:
    """Start (or find running) the stack and read the ``export NAME=value`` lines it prints."""
    proc = subprocess.run([str(UP_SCRIPT)], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"scripts/up.sh failed:\n{proc.stderr.strip()}")
    exports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line.removeprefix("export ").partition("=")
            exports[name.strip()] = value.strip().strip("'\"")
    if "RGRID_API_URL" not in exports:
        raise BenchError(f"scripts/up.sh printed no RGRID_API_URL:\n{proc.stdout}")
    return exports


@contextmanager
def bench_env() -> Iterator[Env]:
    """Temp folders and CLI environments; on the way out, every image and folder made here."""
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-"))
    env = Env(
        root=root,
        embedded_env={**clean_environ(), "RGRID_DATA_DIR": str(root / "embedded-data")},
        stack_env={},
    )
    try:
        (root / "cwd").mkdir()  # the CLI writes ./rgrid-outputs/<id>/ under its cwd
        env.warm_embedded = unique_script(root, "warm-embedded")
        env.warm_stack = unique_script(root, "warm-stack")
        env.preexisting_exec_tags = exec_tags()
        env.stack_env = {**clean_environ(), **stack_exports()}
        yield env
    finally:
        remove_images(env)
        shutil.rmtree(root, ignore_errors=True)


def remove_images(env: Env) -> None:
    """Floor images are always ours. An rgrid-exec image is removed only if it appeared during
    this run; rgrid-runtime is never touched."""
    ours = env.made_exec_images - env.preexisting_exec_tags
    ours = {ref for ref in ours if ref.startswith(f"{EXEC_REPOSITORY}:")}
    refs = sorted(ours | env.made_floor_images)
    if not refs:
        return
    proc = subprocess.run(["docker", "rmi", *refs], capture_output=True, text=True, check=False)
    print(f"cleanup: removed {len(refs)} image(s) made by this run", file=sys.stderr)
    if proc.returncode != 0:
        print(f"cleanup: docker rmi: {proc.stderr.strip()}", file=sys.stderr)


# --- the things being measured ---------------------------------------------------------------

#: A measurement: wall seconds and whatever timings the measured thing reported about itself.
Sample = tuple[float, dict]


def unique_script(root: Path, tag: str) -> Path:
    """The small script plus one comment line nobody has hashed before: the edit loop's one
    changed line, and a guaranteed script-cache miss."""
    folder = root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(f"{SCRIPT}# bench {uuid.uuid4().hex}\n")
    return path


def cli_run(env: Env, script: Path, cli_env: dict[str, str], expect_hit: bool | None) -> Sample:
    """One ``rgrid run --json``: wall time of the whole process and the JSON it printed. A run
    that fails, or hits the cache when it should miss (or the reverse), is not a sample: its
    time would measure something else. The image is recorded first, failed or not, so that
    cleanup still finds it."""
    cmd = [str(RGRID), "run", str(script), "--json"]
    elapsed, proc = timed(cmd, env=cli_env, cwd=env.root / "cwd", check=False)
    report = last_json_line(proc.stdout)
    env.made_exec_images.add(report.get("image_ref") or "")
    raise_for_exit(cmd, proc)
    if report.get("status") != "succeeded" or not report.get("outputs_dir"):
        raise BenchError(f"rgrid run did not succeed with an output: {report}")
    if expect_hit is not None and bool(report.get("script_cache_hit")) != expect_hit:
        raise BenchError(f"expected a script cache {'hit' if expect_hit else 'miss'}: {report}")
    return elapsed, report


def last_json_line(stdout: str) -> dict:
    """``--json`` prints one object as the last line of stdout; {} if there is none (a crash)."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def bare_run(image: str, sandboxed: bool) -> Sample:
    """The floor: the same image and command through the docker CLI, nothing around it."""
    flags = SANDBOX_FLAGS if sandboxed else ["--network", "none"]
    elapsed, _ = timed(["docker", "run", "--rm", *flags, image, "python3", SCRIPT_PATH])
    return elapsed, {}


def cli_start() -> Sample:
    """Diagnostic: ``rgrid --version`` does no work at all, so its time is the CLI's fixed cost
    (interpreter start and imports), which every ``rgrid run`` pays before submitting."""
    elapsed, _ = timed([str(RGRID), "--version"])
    return elapsed, {}


def bare_build_and_run(env: Env) -> Sample:
    """The cold floor: a one-line COPY Dockerfile on the classic builder, then one run. The
    tag is recorded before the build so that even a half-finished build gets cleaned up."""
    script = unique_script(env.root, "floor")
    (script.parent / "Dockerfile").write_text(DOCKERFILE)
    tag = f"{FLOOR_REPOSITORY}:{uuid.uuid4().hex[:12]}"
    env.made_floor_images.add(tag)
    build = ["docker", "build", "-q", "--force-rm", "-t", tag, str(script.parent)]
    build_s, _ = timed(build, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    run_s, _ = bare_run(tag, sandboxed=False)
    return build_s + run_s, {"build_s": build_s, "run_s": run_s}


def warm_up(env: Env) -> None:
    """One untimed pass over the warm rows (a build for each CLI row), so that every timed warm
    run is a cache hit on an engine with the image's layers in the page cache.

    Each mode gets its own script, new to this run: the embedded account and the stack's account
    can have the same id, hence the same image tag for the same script, and a second build would
    leave the first image dangling where cleanup cannot see it. A new script also means every
    rgrid-exec image this run reports is one it made, and can remove."""
    row = env.warmup
    _, report = measure_with_retries(
        row, lambda: cli_run(env, env.warm_embedded, env.embedded_env, expect_hit=None)
    )
    env.warm_image = report["image_ref"]
    measure_with_retries(row, lambda: cli_run(env, env.warm_stack, env.stack_env, expect_hit=None))
    measure_with_retries(row, lambda: bare_run(env.warm_image, sandboxed=False))
    measure_with_retries(row, lambda: bare_run(env.warm_image, sandboxed=True))


# --- rows and rounds -------------------------------------------------------------------------

Measure = Callable[[], Sample]

#: Attempts per sample before the benchmark gives up (see :func:`measure_with_retries`).
MAX_ATTEMPTS = 3

FLOOR = "floor"
SANDBOX_FLOOR = "sandbox-floor"
COLD_FLOOR = "cold-floor"


def warm_rows(env: Env) -> list[tuple[Row, Measure]]:
    image = env.warm_image
    return [
        (
            Row(FLOOR, "floor: `docker run --rm --network none` IMAGE"),
            lambda: bare_run(image, sandboxed=False),
        ),
        (
            Row(SANDBOX_FLOOR, "floor: `docker run --rm` + RGrid's sandbox flags"),
            lambda: bare_run(image, sandboxed=True),
        ),
        (
            Row("warm-embedded", "`rgrid run`, embedded default"),
            lambda: cli_run(env, env.warm_embedded, env.embedded_env, expect_hit=True),
        ),
        (
            Row("warm-stack", "`rgrid run`, against the stack"),
            lambda: cli_run(env, env.warm_stack, env.stack_env, expect_hit=True),
        ),
        (Row("cli-start", "diagnostic: `rgrid --version` (CLI start-up only)"), cli_start),
    ]


def cold_rows(env: Env) -> list[tuple[Row, Measure]]:
    def cold(cli_env: dict[str, str], tag: str) -> Measure:
        return lambda: cli_run(env, unique_script(env.root, tag), cli_env, expect_hit=False)

    return [
        (
            Row(COLD_FLOOR, "floor: `DOCKER_BUILDKIT=0 docker build` + `docker run --rm`"),
            lambda: bare_build_and_run(env),
        ),
        (
            Row("cold-embedded", "`rgrid run` new script, embedded default"),
            cold(env.embedded_env, "emb"),
        ),
        (
            Row("cold-stack", "`rgrid run` new script, against the stack"),
            cold(env.stack_env, "stack"),
        ),
    ]


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
        except BenchError as exc:
            row.failures.append(str(exc).strip().splitlines()[-1])
            print(f"  {row.key}: run failed (attempt {attempt}): {exc}", file=sys.stderr)
    raise BenchError(f"{row.label}: {MAX_ATTEMPTS} attempts in a row failed")


# --- the report ------------------------------------------------------------------------------


def _median_of(row: Row, name: str) -> float | None:
    values = [r[name] for r in row.reports if isinstance(r.get(name), int | float)]
    return statistics.median(values) if values else None


def own_timings(row: Row) -> str:
    """What rgrid (or the bare build) said about itself, and the wall time outside the
    pipeline: process start, imports, submission, polling, the download, exit."""
    parts = []
    for name, label in (("build_s", "build"), ("run_s", "run"), ("duration_s", "pipeline")):
        value = _median_of(row, name)
        if value is not None:
            parts.append(f"{label} {value:.2f}")
    durations = [r.get("duration_s") for r in row.reports]
    if durations and all(isinstance(d, int | float) for d in durations):
        outside = statistics.median(t - d for t, d in zip(row.times, durations, strict=True))
        parts.append(f"**outside pipeline {outside:.2f}**")
    if row.failures:
        parts.append(f"⚠ {len(row.failures)} failed run(s) retried")
    return ", ".join(parts)


def failure_notes(rows: list[Row]) -> str:
    """The failed (and retried) runs under the table: a number with a hidden retry is a lie."""
    lines = [f"- {row.label}: {msg}" for row in rows for msg in row.failures]
    return "Failed runs (retried, not timed):\n\n" + "\n".join(lines) if lines else ""


def ratio(row: Row, floor: Row | None) -> str:
    return f"{row.median / floor.median:.2f}×" if floor else ""


def table(sections: list[tuple[str, list[Row]]]) -> str:
    """Markdown: median and min per row, median ÷ floor median, rgrid's own timings."""
    lines = [
        "| row | median s | min s | ÷ floor | ÷ sandboxed floor | own timings, median s |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    by_key = {row.key: row for _, rows in sections for row in rows}
    for title, rows in sections:
        lines.append(f"| **{title}** | | | | | |")
        for row in rows:
            cold = row.key.startswith("cold")
            floor = by_key[COLD_FLOOR] if cold else by_key[FLOOR]
            sandbox = None if cold else by_key[SANDBOX_FLOOR]
            lines.append(
                f"| {row.label} | {row.median:.3f} | {row.best:.3f} | {ratio(row, floor)} "
                f"| {ratio(row, sandbox)} | {own_timings(row)} |"
            )
    return "\n".join(lines)


def machine_facts() -> list[str]:
    """Enough to tell two result files apart: ratios move with the host, not only the code."""
    now = dt.datetime.now(dt.UTC).astimezone()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- date: {now.isoformat(timespec='seconds')}",
        f"- nproc: {output_of(['nproc'])}",
        f"- docker server: {docker_server_version()}",
        f"- kernel: {platform.release()}; python (CLI): {platform.python_version()}",
        f"- load average before the run: {load}",
    ]


def write_results(command: str, facts: list[str], body: str, repeat: int) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(
        "# RGrid benchmark\n\n"
        f"Command: `{command}`\n\n"
        + "\n".join(facts)
        + f"\n- repetitions per row: {repeat} (interleaved rounds)\n\n"
        + body
        + "\n\n"
        + LEGEND
    )


LEGEND = """\
Times are wall seconds of the whole process, from start to exit. Ratios are median ÷ median of \
the row's floor (warm rows: the bare run; cold rows: the bare build + run). Cold rows run a \
script that was never seen before (one unique comment line): that is also the edit loop, \
one changed line, since these scripts have no dependencies. "pipeline" is rgrid's own \
`duration_s` (submission to final status); "outside pipeline" is wall time minus that: \
interpreter start, imports, client setup, polling, the download and exit.
"""


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable, REPO), "bench/run.py", *sys.argv[1:]])
    facts = machine_facts()
    try:
        with bench_env() as env:
            print("warming up (embedded default and stack)…", file=sys.stderr)
            warm_up(env)
            warm = warm_rows(env)
            run_rounds(warm, args.repeat, "warm")
            cold = cold_rows(env)
            run_rounds(cold, args.repeat, "cold")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    sections = [
        ("1. Warm run (script cache hit)", [row for row, _ in warm]),
        (
            "2. Cold run (new script → build) = 3. Edit loop (one changed line)",
            [row for row, _ in cold],
        ),
    ]
    all_rows = [env.warmup, *(row for _, rows in sections for row in rows)]
    body = "\n\n".join(part for part in (table(sections), failure_notes(all_rows)) if part)
    print(body)
    write_results(command, facts, body, args.repeat)
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
