"""Many worker hosts on one machine (issue 14). Two figures:

1. throughput: N cached runs of one script from 20 client threads through the API, on a grid
   of 1 worker host and then of 3 (each host a Docker engine of its own with its worker,
   scripts/hosts.py), in executions/s, with this machine's CPU count: the hosts share it.
2. first run of a known environment (its pins already resolved): on the host that has it
   warm, on a host that lacks it but has the wheels in its uv cache (a purge took the
   folder), and on a host that has nothing (a new host: wheels fetched into its own cache).
   Run in process through the pipeline with one data folder per host, so only the host's
   local state differs.

Run: `.venv/bin/python bench/hosts.py [--runs 300] [--threads 20] [--part throughput|first-run]`.
Each part uses a database, queue and folders of its own. Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from rgrid.client.remote import RemoteClient
from rgrid.core import cache_keys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import load  # noqa: E402
from scripts import devenv, launcher  # noqa: E402 - the one stack launcher

SCRIPT = "print('hosts')\n"
REQUIREMENTS = "numpy\nsix\n"
IMPORTS = "import numpy, six\nprint(numpy.__version__)\n"


def run_once(client: RemoteClient) -> dict:
    return load.run_once(client, SCRIPT, "hosts.py")


def throughput(host_count: int, runs: int, threads: int) -> tuple[float, dict, dict]:
    """(executions/s, statuses, runs per host) of ``runs`` cached runs on ``host_count``."""
    import threading

    from rgrid.core.db import upgrade

    with devenv.fresh_database("rgrid_bench_hosts") as url:
        upgrade(url)
        env = {
            **os.environ,
            **devenv.dev_env(),
            "RGRID_DATABASE_URL": url,
            "RGRID_REDIS_URL": "redis://127.0.0.1:6379/1",
            "RGRID_QUEUE": f"bench-hosts-{secrets.token_hex(4)}",
            # One account submits every run: measure the hosts, not the per-account limit.
            "RGRID_MAX_CONCURRENT_PER_ACCOUNT": "0",
        }
        with tempfile.TemporaryDirectory(prefix="rgrid-bench-hosts-") as tmp:
            port = devenv.free_port()
            config = launcher.StackConfig(
                env=env,
                log_dir=Path(tmp),
                name=f"bench-{port}",
                api_port=port,
                roles=("api", "worker"),
                supervised=False,
                hosts=host_count,
            )
            with launcher.Stack(config):
                key = launcher.create_account_key(env, "bench")
                local = threading.local()

                def client() -> RemoteClient:
                    if not hasattr(local, "client"):
                        local.client = RemoteClient(config.api_url, key)
                    return local.client

                for _ in range(3):  # a script cache hit and warm pools for every timed run
                    run_once(client())
                started = time.monotonic()
                with ThreadPoolExecutor(threads) as pool:
                    results = list(pool.map(lambda _: run_once(client()), range(runs)))
                wall = time.monotonic() - started
    statuses = {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}}
    per_host = {h: sum(r["host"] == h for r in results) for h in {r["host"] for r in results}}
    return runs / wall, statuses, per_host


def first_run_costs(rounds: int) -> dict[str, list[float]]:
    """Wall seconds of runs of IMPORTS (pins known) on hosts in three states, ``rounds``
    times each (a new host each round)."""
    from rgrid.core.db import upgrade
    from rgrid.host import environments
    from rgrid.service.context import server_context

    dev = devenv.dev_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, dev[key])
    costs: dict[str, list[float]] = {}
    #: deps_build_s of each run, by host: the install's share of the first run.
    installs: dict[str, list[float]] = {}
    # The bytecode compile after each first run may still write into the folders at the end.
    with (
        devenv.fresh_database("rgrid_bench_hosts") as url,
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp,
    ):
        upgrade(url)
        base = host_settings(url, dev)

        def host(name: str):
            return server_context(replace(base, data_dir=Path(tmp) / name, host_name=name))

        first = host("a")
        account_id = bench_account(first)

        def timed(ctx) -> float:
            return first_run(ctx, account_id, installs)

        costs["resolve + install (the set's first run anywhere)"] = [timed(first)]
        first.join_background()
        time.sleep(3)  # the bytecode compile after the first run
        contexts = [first]
        for round_ in range(rounds):  # a new host each round, in the same three states
            other = host(f"b{round_}")
            contexts.append(other)
            costs.setdefault("warm host (environment there)", []).append(timed(first))
            costs.setdefault("new host (no environment, empty uv cache)", []).append(timed(other))
            other.join_background()
            time.sleep(3)
            env_root = other.settings.environments_dir
            for folder in env_root.iterdir():
                if not folder.name.startswith("."):
                    environments.remove(env_root, folder.name)
            costs.setdefault("host whose environment was purged (uv cache kept)", []).append(
                timed(other)
            )
        tidy_hosts(contexts, base.queue)
        time.sleep(5)
    print(
        "deps_build_s per run, by host:", {h: [round(x, 2) for x in v] for h, v in installs.items()}
    )
    return costs


def host_settings(url: str, dev: dict[str, str]):
    """The settings every in-process host shares: the scratch database, the tests' Redis
    database, a new bucket and queue (each host adds its data folder and name)."""
    from rgrid.core.config import Settings

    return replace(
        Settings.from_env(),
        database_url=url,
        redis_url="redis://127.0.0.1:6379/1",
        s3_endpoint_url=dev["RGRID_S3_ENDPOINT_URL"],
        s3_bucket=f"rgrid-bench-{secrets.token_hex(4)}",
        queue=f"bench-hosts-{secrets.token_hex(4)}",
    )


def bench_account(ctx) -> int:
    """The one account every run is submitted for."""
    from rgrid.core.db import session_scope
    from rgrid.core.models import Account

    with session_scope(ctx.session_factory) as session:
        account = Account(name="bench")
        session.add(account)
        session.flush()
        return account.id


def first_run(ctx, account_id: int, installs: dict[str, list[float]]) -> float:
    """One run of IMPORTS through the pipeline on the host ``ctx``: its wall seconds; its
    ``deps_build_s`` goes into ``installs`` under the host's name."""
    from rgrid.core.db import session_scope
    from rgrid.pipeline.chain import run_all
    from rgrid.service import executions as svc

    with session_scope(ctx.session_factory) as session:
        execution_id = svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account_id,
            script=IMPORTS,
            script_name="bench.py",
            requirements=REQUIREMENTS,
        ).id
    started = time.monotonic()
    run_all(ctx, execution_id)
    took = time.monotonic() - started
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, execution_id)
        assert row.status == "succeeded", row.status
        installs.setdefault(ctx.settings.host_name, []).append(row.deps_build_s or 0.0)
    return took


def tidy_hosts(contexts: list, queue: str) -> None:
    """Each host's background work ended and its warm sandboxes retired; the queue's Redis
    keys removed."""
    for ctx in contexts:
        ctx.join_background()
        stack_retire(ctx.settings.data_dir)
    for key in contexts[0].hosts.client.scan_iter(cache_keys.deployment_keys_pattern(queue)):
        contexts[0].hosts.client.delete(key)


def stack_retire(data_dir: Path) -> None:
    import docker

    from rgrid.core.config import Settings
    from rgrid.host import pool

    pool.retire_installation(docker.from_env(), Settings(data_dir=data_dir).sandboxes_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="first-run rounds")
    parser.add_argument("--part", choices=("throughput", "first-run", "all"), default="all")
    args = parser.parse_args()
    if args.part in ("throughput", "all"):
        print(f"CPU count {os.cpu_count()}; {args.runs} cached runs, {args.threads} threads")
        for count in (1, 3):
            rate, statuses, per_host = throughput(count, args.runs, args.threads)
            print(f"{count} host(s): {rate:.2f} executions/s; {statuses}; per host {per_host}")
    if args.part in ("first-run", "all"):
        for what, seconds in first_run_costs(args.rounds).items():
            shown = ", ".join(f"{s:.2f}" for s in seconds)
            print(f"first run, {what}: median {statistics.median(seconds):.2f} s ({shown})")


if __name__ == "__main__":
    main()
