"""Batch reuse: a batch of N inputs run once, then re-submitted with `--reuse` after
changing K of its inputs (issue 23's target: the re-submission's wall time <= 0.1x the first
run's), side by side against a private stack of this checkout and the embedded default.
Both are the whole `rgrid run --batch ... --json` CLI process, outputs fetched; the
re-submission must run exactly K executions (the rest are answered from the first run's
outputs), or the bench says so.

Run: `.venv/bin/python bench/reuse_batch.py [--runs 1000] [--changed 10] [--no-embedded]`.
Nothing passes or fails; everything made is removed at the end."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RGRID, clean_environ, say  # noqa: E402 - the shared harness
from bench.stacks import private_stack, remove_containers_mounting  # noqa: E402

#: Reads its input and writes one output (no dependencies: the cost is the runs themselves).
SCRIPT = """\
import sys
text = open(sys.argv[1]).read()
open("outputs/out.txt", "w").write(text.upper())
"""


def batch(env: dict[str, str], cwd: Path, *extra: str) -> tuple[float, dict, list[dict]]:
    """One `rgrid run --batch` CLI process (stdin /dev/null, as from a terminal): (wall
    seconds, its summary, its executions)."""
    cmd = [str(RGRID), "run", "process.py", "--batch", "inputs", "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines or not lines[-1].get("summary"):
        raise SystemExit(f"the batch failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, lines[-1], lines[:-1]


def measure(label: str, env: dict[str, str], root: Path, runs: int, changed: int) -> float:
    cwd = root / label
    (cwd / "inputs").mkdir(parents=True)
    (cwd / "process.py").write_text(SCRIPT)
    for number in range(runs):
        (cwd / "inputs" / f"in{number:05d}.txt").write_text(f"item {number}\n")
    # Untimed: one run warms the API, the worker, the store and the sandbox pool.
    (cwd / "hello.py").write_text("print('hello')\n")
    subprocess.run(
        [str(RGRID), "run", "hello.py", "--json"],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    first_wall, first, _ = batch(env, cwd, "--reuse")
    say(f"  {label}: first run of {runs}: {first_wall:.1f} s, statuses {first['counts']}")
    step = max(1, runs // max(1, changed))
    for number in range(0, step * changed, step):
        (cwd / "inputs" / f"in{number:05d}.txt").write_text(f"item {number}, changed\n")
    again_wall, again, executions = batch(env, cwd, "--reuse")
    ran = sum(1 for e in executions if e.get("reused_from") is None)
    say(
        f"  {label}: re-submitted with --reuse after changing {changed}: {again_wall:.1f} s,"
        f" {again['reused']} reused · {ran} ran, statuses {again['counts']}"
    )
    if ran != changed:
        say(f"  {label}: expected exactly {changed} to run, {ran} ran")
    ratio = again_wall / first_wall
    say(f"  {label}: re-submission / first run: {ratio:.3f}x (target <= 0.1x)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--no-embedded", action="store_true", help="Only against the stack.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-reuse-batch-"))
    results: dict[str, float] = {}
    try:
        say(f"batch of {args.runs}, re-submitted with --reuse after changing {args.changed}:")
        with private_stack(root) as exports:
            env = {**clean_environ(), **exports}
            results["stack"] = measure("stack", env, root, args.runs, args.changed)
        if not args.no_embedded:
            env = {**clean_environ(), "RGRID_DATA_DIR": str(root / "embedded-data")}
            results["embedded"] = measure("embedded", env, root, args.runs, args.changed)
        say(
            "re-submission / first run: "
            + ", ".join(f"{mode} {ratio:.3f}x" for mode, ratio in results.items())
            + " (target <= 0.1x)"
        )
    finally:
        try:
            remove_containers_mounting([root])
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
