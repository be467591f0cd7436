"""Input-file benchmark (`make bench` runs it after bench/run.py).

Measures what the input cache promises, against the running stack:
1. hashing throughput of the CLI's hasher against `openssl dgst -sha256` on the same 1 GiB
   file, as a ratio (sha256sum is no floor: it measured 4x slower than OpenSSL here);
2. bytes uploaded by the first and second run of a 1 GiB input (the second must be 0);
3. bytes uploaded when 1 of 100 input files changes;
4. peak memory (max RSS) of the CLI process while it sends a 2 GiB file.
Figures go to stdout as a Markdown table and to bench/results/inputs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "inputs.md"
GIB = 1024**3
SCRIPT = "import os, sys\nprint(sum(os.path.getsize(p) for p in sys.argv[1:]))\n"

sys.path.insert(0, str(REPO))
from bench.harness import RGRID, timed  # noqa: E402 - the shared harness
from rgrid.store.inputs import InputFile, hash_files  # noqa: E402
from scripts import stack  # noqa: E402


def write_random(path: Path, size: int) -> None:
    """Random bytes (incompressible, unique per run so no earlier upload is reused)."""
    with open(path, "wb") as fh:
        block = os.urandom(16 * 1024 * 1024)
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            fh.write(os.urandom(16) + chunk[16:])  # a fresh prefix per block: no repeats
            written += len(chunk)


def stack_env() -> dict[str, str]:
    """The caller's environment pointed at the stack `make up` starts or finds."""
    return {**os.environ, **stack.up()}


def run_cli(args: list[str], env: dict, cwd: Path) -> tuple[dict, float, int]:
    """One `rgrid run --json`; returns its JSON, wall seconds and max RSS in KiB."""
    wall, result = timed(
        ["/usr/bin/time", "-f", "%M", str(RGRID), "run", *args, "--json"], env=env, cwd=cwd
    )
    rss_kib = int(result.stderr.strip().splitlines()[-1])
    return json.loads(result.stdout.strip().splitlines()[-1]), wall, rss_kib


def bench_hashing(path: Path, repeat: int) -> list[str]:
    ours, floor = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(["openssl", "dgst", "-sha256", str(path)], check=True, capture_output=True)
        floor.append(time.perf_counter() - started)
        item = InputFile(name="x", path=path, size=path.stat().st_size)
        started = time.perf_counter()
        hash_files([item])
        ours.append(time.perf_counter() - started)
    size_mb = path.stat().st_size / 1024**2
    f, o = statistics.median(floor), statistics.median(ours)
    return [
        f"| `openssl dgst -sha256` 1 GiB (floor) | {f:.2f} s | {size_mb / f:.0f} MiB/s | 1.00× |",
        f"| RGrid CLI hasher, same file | {o:.2f} s | {size_mb / o:.0f} MiB/s | {o / f:.2f}× |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    env = stack_env()
    rows = ["| measurement | time | figure | ratio |", "| --- | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory(prefix="rgrid-bench-inputs-", dir=REPO / ".rgrid-dev") as d:
        work = Path(d)
        (work / "count.py").write_text(SCRIPT)
        print("writing 1 GiB…", file=sys.stderr)
        write_random(work / "one.bin", GIB)
        rows += bench_hashing(work / "one.bin", args.repeat)

        print("1 GiB input, twice…", file=sys.stderr)
        first, t1, _ = run_cli(["count.py", "one.bin"], env, work)
        second, t2, _ = run_cli(["count.py", "one.bin"], env, work)
        rows.append(
            f"| 1 GiB input, first run | {t1:.1f} s | {first['bytes_uploaded']:,} B uploaded | |"
        )
        rows.append(
            f"| 1 GiB input, second run | {t2:.1f} s | {second['bytes_uploaded']:,} B "
            f"uploaded (input cache {'hit' if second['input_cache_hit'] else 'MISS'}) "
            "| |"
        )

        print("100 files, then one changed…", file=sys.stderr)
        (work / "many").mkdir()
        for i in range(100):
            write_random(work / "many" / f"f{i:03}.bin", 1024 * 1024)
        before, t3, _ = run_cli(["count.py", "many"], env, work)
        write_random(work / "many" / "f042.bin", 1024 * 1024)
        after, t4, _ = run_cli(["count.py", "many"], env, work)
        rows.append(
            f"| 100 × 1 MiB files, first run | {t3:.1f} s | "
            f"{before['files_uploaded']} files, {before['bytes_uploaded']:,} B | |"
        )
        rows.append(
            f"| same, 1 of 100 changed | {t4:.1f} s | {after['files_uploaded']} file, "
            f"{after['bytes_uploaded']:,} B | |"
        )
        (work / "one.bin").unlink()

        print("2 GiB input: peak memory of the CLI…", file=sys.stderr)
        write_random(work / "two.bin", 2 * GIB)
        two, t5, rss = run_cli(["count.py", "two.bin"], env, work)
        rows.append(
            f"| 2 GiB input sent: CLI peak RSS | {t5:.1f} s | {rss / 1024:.0f} MiB "
            f"(uploaded {two['bytes_uploaded'] / GIB:.2f} GiB) | |"
        )
    table = "\n".join(rows)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Inputs benchmark\n\nCommand: `.venv/bin/python bench/inputs.py`\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
