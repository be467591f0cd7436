"""RGrid benchmark: what a run costs through the CLI, next to the bare floor beneath it.

The bar: a warm run costs no more than a bare ``docker run`` of the same script on the same
host, editing one line costs the same as a warm run, and a new requirements set costs about
what ``uv pip install`` of it costs on the host. This measures each of those in one
invocation, as ratios against its floor, plus a first run of a PEP 723 pandas script against
``uv run`` of it; nothing here passes or fails. Every measurement is the wall time of a whole
process (``time.perf_counter`` around ``subprocess.run``), because that is what a user waits
for: interpreter start, imports, submission, the sandbox, the summary, the download.

Repetitions are interleaved (each round runs every row of a section once, in a rotated order)
so that a slow spell on a shared machine spreads over all rows instead of landing on one.

Run with ``make bench`` or ``.venv/bin/python bench/run.py [--repeat N] [--stack private]``.
Needs the runtime image (``make setup``), the local services and the package index (numpy,
six, pandas; pip for the ``docker build`` floor's Dockerfile). The stack is the one ``make up``
starts (idempotent), or with ``--stack private`` an API and a worker of this checkout that the
benchmark starts (with the same launcher, scripts/launcher.py) on a database, Redis database and
bucket of their own, and stops at the end. Every image, container, environment folder and
temporary directory made here (and a private stack's database and bucket) is removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import rows_deps, rows_reuse, rows_stdin, rows_warm  # noqa: E402
from bench.harness import (  # noqa: E402
    REPO,
    UV,
    BenchError,
    Row,
    docker_server_version,
    failure_notes,
    output_of,
    table,
)
from bench.session import Env, bench_env  # noqa: E402

RESULTS_FILE = REPO / "bench" / "results" / "latest.md"
#: The benchmark's sections, in the order they run (``--only`` picks some).
SECTIONS = ("warm", "stdin", "reuse", "edit", "new-set", "pep723")


# --- the report ------------------------------------------------------------------------------


def machine_facts(stack_kind: str) -> list[str]:
    """Enough to tell two result files apart: ratios move with the host, not only the code."""
    now = dt.datetime.now(dt.UTC).astimezone()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    uv_version = output_of([str(UV), "--version"])
    stack = {
        "up": "the one `make up` runs",
        "private": "private (`--stack private`: API + worker of this checkout, fresh database)",
    }[stack_kind]
    return [
        f"- date: {now.isoformat(timespec='seconds')}",
        f"- nproc: {output_of(['nproc'])}",
        f"- docker server: {docker_server_version()}; {uv_version}",
        f"- kernel: {platform.release()}; python (CLI): {platform.python_version()}",
        f"- stack: {stack}",
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
the row's floor; "target" is issue 7's bound for that ratio. Floors run the same script on the \
same runtime image (`rgrid-runtime:python-3.11`) with the script bind-mounted read-only at \
`/work/script.py` and a writable `/work/outputs`, as in RGrid's sandbox; the edit floor also \
mounts a dependency folder installed once by uv with RGrid's flags (bytecode compiled) at \
`/opt/rgrid/deps`, read-only, on `PYTHONPATH`. Section 3 installs a requirements set never \
seen before (numpy, six and a tiny local package of a new version from a new `--find-links` \
folder) with uv's cache warm for RGrid and for the bare uv row, none for the floor's pip (a \
`docker build` has no cache between builds). Section 5's script names pandas and a new version \
of the tiny package (a URL on a local HTTP server) in its PEP 723 block, so every run, RGrid's \
and `uv run`'s, is the first run of a new set; both use a warm uv cache. After every RGrid run \
that installed a set, the benchmark waits (untimed) for RGrid's background bytecode compile, so \
it lands on no other row. "deps" is rgrid's `deps_build_s` (the one uv install, into a new \
folder); "uv: resolved/prepared/installed" are uv's own figures from the execution's log \
(excluding uv's start-up); "run" is `run_s`, "pipeline" `duration_s` (submission to final \
status); "outside pipeline" is wall time minus that: interpreter start, imports, client setup, \
polling, the download and exit. "warm sandbox k/n": runs that claimed a pre-started sandbox. \
"bytecode compile left after exit": how long RGrid's background compile of the new set still \
ran after the CLI exited (the benchmark's untimed wait; the run itself imported without it). \
On the floors, "docker build"/"docker run" and "uv venv"/"uv pip install" are whole processes.
"""


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument(
        "--stack",
        choices=("up", "private"),
        default="up",
        help="the stack from `make up` (default), or a private one started for this run",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only these sections (repeatable; default: all). new-set includes the "
        "dependency-install section",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def run_sections(env: Env, only: set[str], repeat: int) -> list[tuple[str, list[Row]]]:
    """The sections picked by ``only``, in :data:`SECTIONS` order, each after its untimed
    warm-up: (title, rows) for the table."""
    first, uv_cold = rows_deps.context_rows()
    sections: list[tuple[str, list[Row]]] = []
    print("warming up (stack and embedded default)…", file=sys.stderr)
    rows_warm.warm_up(env)
    if "warm" in only:
        sections += rows_warm.section(env, repeat)
    if "stdin" in only:
        sections += rows_stdin.section(env, repeat)
    if "reuse" in only:
        sections += rows_reuse.section(env, repeat)
    if only & {"edit", "new-set"}:
        print("warming up with dependencies…", file=sys.stderr)
        rows_deps.edit_warm_up(env, first)
    if "edit" in only:
        sections += rows_deps.edit_section(env, repeat)
    if "new-set" in only:
        sections += rows_deps.new_set_section(env, repeat, first, uv_cold)
    if "pep723" in only:
        sections += rows_deps.pep723_section(env, repeat)
    return sections


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    only = set(args.only or SECTIONS)
    command = shlex.join([os.path.relpath(sys.executable, REPO), "bench/run.py", *sys.argv[1:]])
    facts = machine_facts(args.stack)
    try:
        with bench_env(args.stack) as env:
            sections = run_sections(env, only, args.repeat)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    all_rows = [env.warmup, *(row for _, rows in sections for row in rows)]
    body = "\n\n".join(part for part in (table(sections), failure_notes(all_rows)) if part)
    print(body)
    write_results(command, facts, body, args.repeat)
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
