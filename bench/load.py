"""Load: many executions of one cached script from many client threads against the stack, each
submitted and followed as `rgrid run` does. Reports executions/s and how long an execution's
final status takes to appear once its script has ended (script end = started_at + run_s;
final status = finished_at): issue 15 asks that results never wait behind other work.

Run: `.venv/bin/python bench/load.py [--runs 200] [--threads 20]`. It uses the stack
`make up` starts (idempotent). Nothing passes or fails."""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from rgrid.client.remote import RemoteClient
from rgrid.core.config import DEFAULT_RUNTIME
from rgrid.core.spec import RunSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import stack  # noqa: E402 - `make up`'s stack (stack.up)

SCRIPT = "print('load')\n"


class Clients(threading.local):
    """One client (one kept-alive connection) per thread, as separate CLI processes have."""

    def __init__(self, exports: dict[str, str]):
        self.client = RemoteClient(exports["RGRID_API_URL"], exports["RGRID_API_KEY"])


def run_once(client: RemoteClient, script: str = SCRIPT, script_name: str = "load.py") -> dict:
    """Submit ``script`` and follow its log (the long poll, as ``rgrid run`` does) to the end;
    returns the final execution. Also ``bench/hosts.py``'s one run."""
    spec = RunSpec(script=script, script_name=script_name, runtime=DEFAULT_RUNTIME, timeout_s=60)
    submitted = client.submit(spec)
    offset = 0
    while True:
        page = client.logs(submitted["execution_id"], offset, wait=True)
        offset = page["next_offset"]
        if page["complete"]:
            return page["execution"]


def _seconds(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=20)
    args = parser.parse_args()
    clients = Clients(stack.up())
    run_once(clients.client)  # a script cache hit for every timed run
    started = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        results = list(pool.map(lambda _: run_once(clients.client), range(args.runs)))
    wall = time.monotonic() - started
    lag = sorted(
        _seconds(r["finished_at"]) - (_seconds(r["started_at"]) + r["run_s"])
        for r in results
        if r["started_at"] and r["run_s"] is not None
    )
    statuses = {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}}
    print(
        f"{args.runs} runs from {args.threads} client threads: {wall:.1f} s, "
        f"{args.runs / wall:.2f} executions/s; statuses {statuses}"
    )
    print(
        f"script end -> final status: p50 {statistics.median(lag):.3f} s, "
        f"p95 {lag[int(len(lag) * 0.95) - 1]:.3f} s, max {lag[-1]:.3f} s"
    )


if __name__ == "__main__":
    main()
