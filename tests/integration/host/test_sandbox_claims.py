"""Two executions must never share a sandbox: claims of one warm sandbox at the same moment
(two pool processes of a worker, as a batch keeps them both busy) leave exactly one owner."""

from __future__ import annotations

import threading
from dataclasses import replace

import docker

from rgrid.host import pool, sandbox, sandbox_container
from rgrid.host.runtimes import resolve_runtime


def test_simultaneous_claims_of_one_sandbox_have_one_winner(ctx):
    client = docker.from_env()
    env = sandbox.Environment(image=resolve_runtime("python:3.11").image)
    winners = []
    for _round in range(5):
        box = pool.start(client, env, ctx.limits, ctx.pool)
        barrier = threading.Barrier(4)
        won: list[str] = []

        def claim(number: int, box=box, barrier=barrier, won=won) -> None:
            mine = replace(box)
            barrier.wait()
            if sandbox_container.claim(client, mine, f"claim-test-{number}"):
                won.append(mine.name)

        threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners.append(len(won))
        owner = client.api.inspect_container(box.container_id)["Name"].lstrip("/")
        assert won == [owner]
        sandbox_container.discard(client, replace(box, name=owner))
    assert winners == [1] * 5
