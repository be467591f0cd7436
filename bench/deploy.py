"""Deployed worker hosts (issue 25): hosts in network namespaces of their own, from the wheel
only, configured by their env file (scripts/netns.py, as
tests/integration/host/test_deploy_hosts.py).

1. A new host from nothing to its first run: the wheel installed into a new virtualenv with
   its dependencies (uv; a cold uv cache, from the package index, and a warm one), its
   engine started with the runtime image loaded (`docker save | docker load`), and its first
   run of a new script against its second (the floor: a warm run on that host). A first
   environment install is not measured here: nothing leaves a host's namespace, and the
   resolver asks the package index (bench/hosts.py --part first-run measures it).
2. Throughput: N cached runs queued at once on one namespaced host, then on two, in
   executions/s; the hosts share this machine's CPUs (named in the output).

Run: `.venv/bin/python bench/deploy.py [--runs 40]`. Uses a database, bucket and queue of its
own. Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import devenv, netns  # noqa: E402

SCRIPT = "print('deployed')\n"
TERMINAL = {"succeeded", "failed", "timed_out", "build_failed", "cancelled", "error"}


def _wheel_install(root: Path) -> dict[str, float]:
    wheel = netns.build_wheel(root / "wheel")
    uv = str(Path(sys.executable).parent / "uv")
    times = {}
    for label, cache in (("cold uv cache", root / "uv-cold"), ("warm uv cache", None)):
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        if cache is not None:
            env["UV_CACHE_DIR"] = str(cache)
        venv = root / f"venv-{len(times)}"
        started = time.monotonic()
        subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True, env=env)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)],
            check=True,
            env=env,
        )
        times[label] = time.monotonic() - started
    return times


class Submitter:
    def __init__(self, database_url: str, bucket: str):
        from dataclasses import replace

        from rgrid.core.config import Settings
        from rgrid.core.db import session_scope
        from rgrid.service import accounts
        from rgrid.service.context import server_context

        self.settings = replace(
            Settings.from_env(),
            database_url=database_url,
            s3_bucket=bucket,
            allow_local_find_links=True,
        )
        self.ctx = server_context(self.settings)
        with session_scope(self.ctx.session_factory) as session:
            self.account_id = accounts.create_account(session, f"bench-{bucket}").id

    def submit(self, script: str, **options) -> str:
        from rgrid.core.db import session_scope
        from rgrid.service import executions

        with session_scope(self.ctx.session_factory) as session:
            row = executions.create_execution(
                session,
                self.ctx.store,
                self.settings,
                account_id=self.account_id,
                script=script,
                script_name="bench.py",
                **options,
            )
            return row.id

    def wait(self, ids: list[str], timeout_s: float = 600) -> list:
        from rgrid.core.db import session_scope
        from rgrid.core.models import Execution

        deadline = time.monotonic() + timeout_s
        while True:
            with session_scope(self.ctx.session_factory) as session:
                rows = [session.get(Execution, i) for i in ids]
                session.expunge_all()
            if all(r.status in TERMINAL for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def _grid_run(root: Path, names: tuple[str, ...], url: str, runs: int, first: bool) -> dict:
    bucket = f"bench-deploy-{secrets.token_hex(4)}"
    services = {
        "RGRID_DATABASE_URL": url,
        "RGRID_REDIS_URL": "redis://127.0.0.1:6379/1",
        "RGRID_S3_ENDPOINT_URL": devenv.dev_env()["RGRID_S3_ENDPOINT_URL"],
    }
    dev = devenv.dev_env()
    common = {
        "RGRID_S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": dev["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": dev["AWS_SECRET_ACCESS_KEY"],
        "RGRID_QUEUE": f"bench-deploy-{secrets.token_hex(4)}",
        "RGRID_ALLOW_LOCAL_FIND_LINKS": "1",
        "RGRID_MAX_CONCURRENT_PER_ACCOUNT": "0",
    }
    os.environ.update({**services, **common})  # this process's submitter, as the API
    out: dict = {}
    with netns.deployed(root, names, services, common) as grid:
        out.update(grid.timings)
        submitter = Submitter(url, bucket)
        if first:
            # A new script on the new host: nothing cached there but the runtime image and
            # the warm pool its worker started with.
            script = f"print('first {secrets.token_hex(4)}')\n"
            for label in ("first run on the new host", "second run, same script (floor)"):
                started = time.monotonic()
                ids = [submitter.submit(script)]
                grid.enqueue(ids)
                (row,) = submitter.wait(ids)
                assert row.status == "succeeded", (row.status, row.error, ids)
                out[label] = time.monotonic() - started
        # Warm the script cache, then the measured batch.
        warm = [submitter.submit(SCRIPT)]
        grid.enqueue(warm)
        submitter.wait(warm)
        ids = [submitter.submit(SCRIPT) for _ in range(runs)]
        started = time.monotonic()
        grid.enqueue(ids)
        rows = submitter.wait(ids)
        elapsed = time.monotonic() - started
        out["throughput"] = runs / elapsed
        out["statuses"] = sorted({r.status for r in rows})
        out["per host"] = {h: sum(r.host == h for r in rows) for h in names}
        submitter.ctx.join_background()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    from rgrid.core.db import upgrade

    print(f"machine: {os.cpu_count()} CPU cores, shared by both hosts")
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        for label, seconds in _wheel_install(root).items():
            print(f"wheel + dependencies into a new virtualenv, {label}: {seconds:.1f} s")
        results = {}
        for names in (("b1",), ("b1", "b2")):
            with devenv.fresh_database("rgrid_bench_deploy") as url:
                upgrade(url)
                results[len(names)] = _grid_run(
                    root / f"grid{len(names)}", names, url, args.runs, first=len(names) == 1
                )
        one, two = results[1], results[2]
        for key in ("engines started, runtime image loaded",):
            print(f"1 host: {key}: {one[key]:.1f} s")
        for key in ("first run on the new host", "second run, same script (floor)"):
            print(f"new host: {key}: {one[key]:.2f} s")
        ratio = one["first run on the new host"] / one["second run, same script (floor)"]
        print(f"new host: first run / warm run: {ratio:.1f}x")
        for n, result in results.items():
            print(
                f"{n} host(s): {args.runs} cached runs: {result['throughput']:.2f} exec/s"
                f" {result['statuses']} per host {result['per host']}"
            )
        print(f"two hosts / one: {two['throughput'] / one['throughput']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
