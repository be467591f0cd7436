"""Two worker hosts deployed as an operator deploys them (deploy/, README "Deploying"): each a
network namespace of its own behind a veth pair (scripts/netns.py) with its own dockerd, a
virtualenv holding only the installed wheel, and an environment file rendered from
deploy/rgrid.env as its whole configuration. They reach PostgreSQL, Redis, the S3 endpoint and
the API on the main namespace's veth address, where forwarders listen (the shared services
stay on loopback, untouched). Beat and the API run in the main namespace from the same wheel.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rgrid.core.db import session_scope
from rgrid.core.models import Execution
from rgrid.core.statuses import TERMINAL_STATUSES
from scripts import netns
from tests.conftest import DEV_ENV, stored_log

HOSTS = ("n1", "n2")
#: A running execution's lease on these hosts: a host cut off longer than this loses its runs.
LEASE_S = 20


@pytest.fixture(scope="module")
def grid(server_settings, tmp_path_factory) -> Iterator[netns.Grid]:
    services = {
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
    }
    common = {
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "AWS_ACCESS_KEY_ID": DEV_ENV["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": DEV_ENV["AWS_SECRET_ACCESS_KEY"],
        "RGRID_SECRET_KEY": os.environ["RGRID_SECRET_KEY"],
        "RGRID_QUEUE": f"{os.environ['RGRID_QUEUE']}-net",
        "RGRID_LEASE": str(LEASE_S),
        "RGRID_DEFAULT_TIMEOUT": "120",
        "RGRID_POOL_SIZE": "1",
        "RGRID_POOL_MAX": "2",
    }
    with netns.deployed(tmp_path_factory.mktemp("deploy"), HOSTS, services, common) as grid:
        yield grid


def _rows(ctx, ids: list[str]) -> list[Execution]:
    with session_scope(ctx.session_factory) as session:
        rows = [session.get(Execution, i) for i in ids]
        session.expunge_all()
    return rows


def _wait_terminal(ctx, ids: list[str], timeout_s: float = 180) -> list[Execution]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(ctx, ids)
        if all(r.status in TERMINAL_STATUSES for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


SCRIPT = (
    "import sys, time\n"
    "time.sleep(1)\n"
    "print('done', sys.argv[1])\n"
    "open('outputs/result.txt', 'w').write(sys.argv[1])\n"
)


def test_a_new_host_reaches_every_service_over_its_own_link_only(grid):
    for name, net in grid.nets.items():
        # Its namespace holds its loopback and its link, and no way anywhere else.
        assert sorted(net.interfaces()) == ["lo", net.main_link[:-1] + "h"]
        assert not [r for r in net.routes() if r.startswith("default")]
        result = grid.on_host(name, "admin", "check")
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = result.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["ok", "database"],
            ["ok", "broker"],
            ["ok", "store"],
            ["ok", "docker"],
            ["ok", "api"],
        ], lines
        for line in (lines[0], lines[1], lines[2], lines[4]):
            assert net.main_address in line, line
        # Its RGrid is the wheel's, not this checkout's.
        where = subprocess.run(
            net.command([str(grid.bin / "python"), "-c", "import rgrid; print(rgrid.__file__)"]),
            env=grid.host_env(name),
            cwd=net.engine.dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(where).is_relative_to(grid.bin.parent), where


def test_every_host_may_migrate_at_once(grid):
    running = [
        subprocess.Popen(
            grid.nets[name].command([str(grid.bin / "rgrid"), "admin", "migrate"]),
            env=grid.host_env(name),
            cwd=grid.nets[name].engine.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in HOSTS
    ]
    for process in running:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out.startswith("database is up to date (schema "), out


def test_a_host_cut_off_mid_batch_loses_nothing_and_drains_when_it_is_back(ctx, grid, submit):
    ids = [submit(SCRIPT, args=[str(i)]) for i in range(24)]
    grid.enqueue(ids)

    def ran_on_both() -> bool:
        done = [r for r in _rows(ctx, ids) if r.status == "succeeded"]
        return {r.host for r in done} == set(HOSTS)

    netns.wait_for("runs on both hosts", ran_on_both, 120)
    cut_at = time.time()
    grid.nets["n2"].link(up=False)
    try:
        # n2 stops renewing its heartbeat; what waits for it moves to n1, and n1 runs the
        # rest: all that is left open while n2 is still cut off is what n2's worker holds
        # (two tasks at most: two slots, one prefetched each), on n2 or not yet pinned.
        netns.wait_for("n2 to be taken for gone", lambda: not grid.registry.alive("n2"), 60)

        def only_n2_runs_left() -> bool:
            rows = _rows(ctx, ids)
            open_ = [r for r in rows if r.status not in TERMINAL_STATUSES]
            return len(open_) <= 2 and all(r.host in ("n2", None) for r in open_)

        netns.wait_for("n1 to take n2's waiting work", only_n2_runs_left, 150, every_s=1)
        rows = _rows(ctx, ids)
        after_cut = [r for r in rows if r.finished_at and r.finished_at.timestamp() > cut_at]
        assert any(r.host == "n1" for r in after_cut), [(r.host, r.status) for r in rows]
    finally:
        grid.nets["n2"].link(up=True)

    rows = _wait_terminal(ctx, ids)

    assert all(r.status in TERMINAL_STATUSES for r in rows), [(r.id, r.status) for r in rows]
    for i, row in enumerate(rows):
        if row.status == "succeeded":
            assert stored_log(ctx, row.id, "stdout") == f"done {i}\n", (
                row.host,
                stored_log(ctx, row.id, "phase"),
                stored_log(ctx, row.id, "stderr"),
            )
            assert [o["path"] for o in row.outputs] == ["result.txt"]
        else:  # a run n2 held while cut off past its lease: it says so, nothing else is lost
            assert row.host == "n2" and row.status == "error" and row.error, row
    assert sum(r.status != "succeeded" for r in rows) <= 2  # n2 runs two at a time

    # Back on the network, n2 is drained from its own console: it finishes its runs, takes
    # no new work, and says so.
    drained = grid.on_host("n2", "admin", "drain", "n2", "--wait", "--timeout", "120")
    assert drained.returncode == 0, (drained.stdout, drained.stderr)
    assert drained.stdout.splitlines()[-1] == "n2: drained: nothing running, nothing new"
    later = [submit(SCRIPT, args=[f"later-{i}"]) for i in range(6)]
    grid.enqueue(later)
    rows = _wait_terminal(ctx, later)
    assert [r.status for r in rows] == ["succeeded"] * 6, [(r.status, r.error) for r in rows]
    assert {r.host for r in rows} == {"n1"}
    assert not grid.registry.alive("n2")

    undrained = grid.on_host("n2", "admin", "undrain", "n2")
    assert undrained.stdout == "n2: taking work again\n", undrained
    netns.wait_for("n2's heartbeat again", lambda: grid.registry.alive("n2"), 30)
