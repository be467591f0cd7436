"""Batch: N executions of one cached trivial script through `rgrid run --batch` against a
private stack of this checkout, beside N bare `docker run --rm --network none` of the same
script at the same parallelism (the worker's pool processes). Reports executions/s of both and
their ratio (issue 13's target: >= 0.8x the bare throughput), how many environment builds the
batch caused (target: 1), the CLI's peak memory (ru_maxrss of the child), and how long
submitting a batch of 10,000 small inputs takes (it is then cancelled, not run).

Run: `.venv/bin/python bench/batch.py [--runs 1000] [--submit 10000]`. Nothing passes or
fails; everything made is removed at the end."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import (  # noqa: E402 - the shared harness: paths, the floor's mounts
    RGRID,
    RUNTIME_IMAGE,
    SCRIPT_IN_WORK,
    clean_environ,
    say,
    writable_outputs,
)
from bench.stacks import private_stack, remove_containers_mounting  # noqa: E402
from rgrid.host.runtimes import WORK_DIR  # noqa: E402
from scripts.launcher import StackConfig  # noqa: E402
from tests.wheels import make_wheel  # noqa: E402

#: Reads its input and writes one output, importing a small dependency: one environment.
SCRIPT = """\
import sys
import bench_dep
text = open(sys.argv[1]).read()
open("outputs/out.txt", "w").write(text.upper())
"""
FLOOR_SCRIPT = 'open("/work/outputs/out.txt", "w").write("x")\n'


def child(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    """Run one CLI process: (wall seconds, its peak RSS in KiB, stdout). ru_maxrss of
    RUSAGE_CHILDREN is the largest of the children waited for so far, so each measured
    command runs in a fresh helper process of its own."""
    probe = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps({'wall': wall, 'rss': rss, 'code': p.returncode, 'out': p.stdout}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *cmd], env=env, cwd=cwd, capture_output=True, text=True
    )
    result = json.loads(done.stdout)
    if result["code"] not in (0,):
        print(done.stderr[-2000:], file=sys.stderr)
    return result["wall"], result["rss"], result["out"]


def floor(root: Path, runs: int, parallel: int) -> float:
    script = root / "floor" / "script.py"
    script.parent.mkdir()
    script.write_text(FLOOR_SCRIPT)
    outputs = writable_outputs(script.parent)
    cmd = [
        *("docker", "run", "--rm", "--network", "none"),
        *("-v", f"{outputs}:{WORK_DIR}/outputs", "-v", f"{script}:{SCRIPT_IN_WORK}:ro"),
        *(RUNTIME_IMAGE, "python3", SCRIPT_IN_WORK),
    ]
    subprocess.run(cmd, check=True, capture_output=True)  # untimed warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(
            pool.map(lambda _: subprocess.run(cmd, capture_output=True).returncode, range(runs))
        )
    wall = time.perf_counter() - started
    if any(codes):
        print(f"floor: {sum(1 for c in codes if c)} docker run(s) failed", file=sys.stderr)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--submit", type=int, default=10_000)
    args = parser.parse_args()
    parallel = StackConfig.concurrency
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-batch-"))
    try:
        cwd = make_inputs(root, args.runs, args.submit)
        extra = {"RGRID_ALLOW_LOCAL_FIND_LINKS": "1"}
        with private_stack(root, extra) as exports:
            env = {**clean_environ(), **exports}
            # Untimed: one run warms the API, the worker and the object store; the batch's
            # environment is not built yet, so the batch shows how many builds it causes.
            (cwd / "hello.py").write_text("print('hello')\n")
            warm = [str(RGRID), "run", "hello.py", "--json"]
            subprocess.run(warm, env=env, cwd=cwd, check=True, capture_output=True)
            wall, summary = run_batch(env, cwd, args.runs, parallel)
            submit_many(env, cwd, args.submit)
        floor_wall = floor(root, args.runs, parallel)
        floor_rate = args.runs / floor_wall
        say(
            f"floor, {args.runs} x docker run --rm --network none at parallelism {parallel}:"
            f" {floor_wall:.1f} s, {floor_rate:.2f} executions/s"
        )
        if summary is not None:
            ratio = (args.runs / wall) / floor_rate
            say(f"ratio rgrid / floor throughput: {ratio:.2f}x (target >= 0.8x)")
    finally:
        try:
            remove_containers_mounting([root])
        finally:
            shutil.rmtree(root, ignore_errors=True)


def make_inputs(root: Path, runs: int, submit: int) -> Path:
    """The CLI's working folder: the script, its requirements (a local wheel), ``runs``
    inputs for the timed batch and ``submit`` for the submission-only one."""
    cwd = root / "cwd"
    wheels = root / "wheels"
    for folder in (cwd, wheels, cwd / "inputs", cwd / "many"):
        folder.mkdir(parents=True)
    make_wheel(wheels, "bench-dep", "1.0")
    (cwd / "process.py").write_text(SCRIPT)
    (cwd / "requirements.txt").write_text(f"--find-links {wheels}\nbench-dep\n")
    for number in range(runs):
        (cwd / "inputs" / f"in{number:05d}.txt").write_text(f"item {number}\n")
    for number in range(submit):
        (cwd / "many" / f"m{number:05d}.txt").write_text(f"{number}\n")
    return cwd


def run_batch(
    env: dict[str, str], cwd: Path, runs: int, parallel: int
) -> tuple[float, dict | None]:
    """The timed batch of ``runs`` inputs, one CLI process: prints its figures and returns
    (wall seconds, its summary; None if it failed)."""
    batch = [
        *(str(RGRID), "run", "process.py", "-r", "requirements.txt"),
        *("--batch", "inputs", "--json"),
    ]
    wall, rss, out = child(batch, env, cwd)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    summary = lines[-1] if lines and lines[-1].get("summary") else None
    executions = lines[:-1] if summary else []
    builds = sum(1 for e in executions if e.get("deps_build_s") is not None)
    environments = {e.get("environment") for e in executions}
    say(f"batch of {runs} (worker concurrency {parallel}):")
    if summary is None:
        say(f"  the batch failed: {lines[-1] if lines else 'no output'}")
    else:
        say(f"  statuses {summary['counts']}")
        say(
            f"  rgrid run --batch: {wall:.1f} s whole CLI process,"
            f" {runs / wall:.2f} executions/s (from the start of the batch:"
            f" {summary['executions_per_s']:.2f}/s)"
        )
        say(f"  environment builds in the batch: {builds} (environments: {len(environments)})")
    say(f"  CLI peak memory (ru_maxrss): {rss / 1024:.1f} MiB")
    return wall, summary


def submit_many(env: dict[str, str], cwd: Path, submit: int) -> None:
    """The submission alone of ``submit`` inputs (``--detach``), then the batch cancelled."""
    submit_cmd = [
        *(str(RGRID), "run", "process.py", "-r", "requirements.txt"),
        *("--batch", "many", "--detach", "--parallel", "1"),
    ]
    submit_wall, submit_rss, submit_out = child(submit_cmd, env, cwd)
    batch_id = submit_out.strip()
    subprocess.run([str(RGRID), "batch", "cancel", batch_id], env=env, cwd=cwd, capture_output=True)
    say(
        f"submitting {submit} inputs (hash, upload, add in pages, start): "
        f"{submit_wall:.1f} s, CLI peak memory {submit_rss / 1024:.1f} MiB"
    )


if __name__ == "__main__":
    main()
