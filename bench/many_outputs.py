"""Many-outputs benchmark (`make bench` runs it): 10,000 outputs of 1 KiB (issue 24, item 3).

A script writing one file per record or tile is common. Against a stack of this checkout (an
API and a Celery worker on their own database, Redis database and bucket: bench/stacks.py's
``private_stack``), side by side in interleaved rounds:

- floor: the same script run by the host's ``python3``, writing the files to a local folder;
- ``rgrid run`` end to end: the run, its 10,000 outputs stored, then fetched into
  ``./rgrid-outputs/<id>/`` (every output a new blob: each round's bytes are its own);
- ``rgrid outputs ID``: the fetch alone, into a fresh folder.

Ratios are median ÷ the floor's median. Target: the end-to-end run under 10 s here. Figures go
to stdout as a Markdown table and to bench/results/many_outputs.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.harness import RGRID, clean_environ, timed  # noqa: E402
from bench.stacks import private_stack, remove_containers_mounting  # noqa: E402
from scripts import stack  # noqa: E402

RESULTS = REPO / "bench" / "results" / "many_outputs.md"
COUNT = 10_000
SCRIPT = """
import os, sys
out = sys.argv[1] if len(sys.argv) > 1 else 'outputs'
os.makedirs(out, exist_ok=True)
for i in range({count}):
    with open(os.path.join(out, f'{{i:05}}.txt'), 'w') as fh:
        fh.write(f'{tag} {{i:05}} '.ljust(1024, 'x'))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its logs)")
    parser.add_argument(
        "--stack", choices=("private", "up"), default="private", help="up: `make up`'s stack"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-outputs-"))
    rows: dict[str, list[float]] = {"floor": [], "run": [], "fetch": [], "script": []}
    try:
        if args.stack == "private":
            with private_stack(root) as exports:
                measure(root, {**clean_environ(), **exports}, args, rows)
        else:
            measure(root, {**clean_environ(), **stack.up()}, args, rows)
    finally:
        remove_containers_mounting([root])
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    floor = statistics.median(rows["floor"])

    def row(name: str, key: str) -> str:
        values = rows[key]
        median = statistics.median(values)
        return (
            f"| {name} | {median:.2f} s | {min(values):.2f} s | {median / floor:.1f}× "
            f"| {args.count / median:,.0f} files/s |"
        )

    table = "\n".join(
        [
            f"| {args.count:,} × 1 KiB outputs | median | min | ÷ floor | rate |",
            "| --- | ---: | ---: | ---: | ---: |",
            row("floor: host `python3` writes them locally", "floor"),
            row("the script in RGrid's sandbox (its `run_s`)", "script"),
            row("`rgrid run`, stack: run + store + fetch (target < 10 s)", "run"),
            row("`rgrid outputs ID`, stack: fetch alone", "fetch"),
        ]
    )
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Many-outputs benchmark\n\n"
        f"Command: `.venv/bin/python bench/many_outputs.py --repeat {args.repeat}`\n\n"
        f"{table}\n"
    )
    return 0


def measure(root: Path, env: dict[str, str], args, rows: dict[str, list[float]]) -> None:
    """Interleaved rounds, after one untimed run (it warms the environment's pool)."""
    for round_number in range(args.repeat + 1):
        tag = f"round-{round_number}-{time.time_ns()}"  # new bytes: no output is reused
        work = root / f"work-{round_number}"
        work.mkdir()
        script = work / "tiles.py"
        script.write_text(SCRIPT.format(count=args.count, tag=tag))
        floor, _ = timed(
            [sys.executable, "-S", str(script), str(work / "local")], env=clean_environ(), cwd=work
        )
        run, proc = timed([str(RGRID), "run", str(script), "--json"], env=env, cwd=work)
        execution = json.loads(proc.stdout.strip().splitlines()[-1])
        if execution["status"] != "succeeded" or len(execution["outputs"]) != args.count:
            raise RuntimeError(f"the run did not store {args.count} outputs: {execution}")
        fetch_dir = work / "fetch"
        fetch_dir.mkdir()
        fetch, _ = timed([str(RGRID), "outputs", execution["execution_id"]], env=env, cwd=fetch_dir)
        fetched = list((fetch_dir / "rgrid-outputs" / execution["execution_id"]).iterdir())
        if len(fetched) != args.count:
            raise RuntimeError(f"fetched {len(fetched)} of {args.count} outputs")
        if round_number == 0:
            continue
        rows["floor"].append(floor)
        rows["run"].append(run)
        rows["fetch"].append(fetch)
        rows["script"].append(execution["run_s"])
        print(f"round {round_number}: run {run:.2f} s, fetch {fetch:.2f} s", file=sys.stderr)
        shutil.rmtree(work)


if __name__ == "__main__":
    raise SystemExit(main())
