"""The lease sweep and a lost runner, on the real database: a running execution whose runner
stopped renewing its lease has its run step sent back to its host (which re-attaches to the
sandbox), a bounded number of times; past that, or for a host that is not seen again, it ends
``error: worker lost``."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from rgrid.core.db import session_scope
from rgrid.core.models import Execution, utcnow
from rgrid.pipeline.lost import MAX_RUN_RESENDS, sweep_lost_workers


def _stale(ctx, execution_id: str, host: str) -> None:
    """As a runner killed a while ago leaves the row."""
    with session_scope(ctx.session_factory) as session:
        row = session.get(Execution, execution_id)
        row.status, row.worker, row.host = "running", "gone:1", host
        row.started_at = utcnow() - timedelta(minutes=1)
        row.heartbeat_at = utcnow() - timedelta(seconds=ctx.settings.lease_s + 5)


def _row(ctx, execution_id: str) -> Execution:
    with session_scope(ctx.session_factory) as session:
        return session.get(Execution, execution_id)


def test_a_live_host_gets_the_run_step_back_a_bounded_number_of_times(ctx, submit):
    execution_id = submit("print('x')\n")
    host = f"live-{execution_id[:6]}"
    ctx.hosts.beat(host)
    sent: list[tuple[str, str | None]] = []
    for attempt in range(1, MAX_RUN_RESENDS + 1):
        _stale(ctx, execution_id, host)
        ctx.hosts.beat(host)
        assert sweep_lost_workers(ctx, resend=lambda *a: sent.append(a)) == []
        assert sent[-1] == (execution_id, host)
        row = _row(ctx, execution_id)
        assert (row.status, row.run_resends) == ("running", attempt)
        # A second sweep at once does nothing: the lease was renewed for the step on its way.
        sweep_lost_workers(ctx, resend=lambda *a: sent.append(a))
        assert len(sent) == attempt
    _stale(ctx, execution_id, host)
    assert sweep_lost_workers(ctx, resend=lambda *a: sent.append(a)) == [execution_id]
    row = _row(ctx, execution_id)
    assert row.status == "error" and row.error.startswith("worker lost: ")
    assert len(sent) == MAX_RUN_RESENDS


def test_a_host_not_seen_again_gets_one_lease_of_grace(ctx, submit):
    execution_id = submit("print('x')\n")
    host = f"gone-{execution_id[:6]}"
    sent: list[tuple[str, str | None]] = []
    _stale(ctx, execution_id, host)
    assert sweep_lost_workers(ctx, resend=lambda *a: sent.append(a)) == []
    assert sent == [(execution_id, host)]
    log = [text for _, text in ctx.logs.read(execution_id)]
    assert any("goes back to its host" in text for text in log)
    _stale(ctx, execution_id, host)
    assert sweep_lost_workers(ctx, resend=lambda *a: sent.append(a)) == [execution_id]
    assert _row(ctx, execution_id).status == "error"


def test_without_a_resend_the_sweep_ends_it_at_once(ctx, submit):
    """The embedded default's sweep (no queue to send to)."""
    execution_id = submit("print('x')\n")
    _stale(ctx, execution_id, "any")
    swept = sweep_lost_workers(replace(ctx, hosts=None))
    assert swept == [execution_id]


def test_the_reaper_forgets_journals_of_executions_that_are_over(ctx, submit, tmp_path):
    """A journal whose execution another host ended is not left on this host for ever."""
    import os
    import time

    from rgrid.service.maintenance import forget_finished_journals

    over, running = submit("print(1)\n"), submit("print(2)\n")
    _stale(ctx, running, "any")
    with session_scope(ctx.session_factory) as session:
        session.get(Execution, over).status = "error"
    old = time.time() - 3600
    for execution_id in (over, running):
        path = tmp_path / f"{execution_id}.jsonl"
        path.write_text('["system", "x\\n"]\n')
        os.utime(path, (old, old))
    with session_scope(ctx.session_factory) as session:
        assert forget_finished_journals(session, tmp_path) == 1
    assert sorted(p.stem for p in tmp_path.glob("*.jsonl")) == [running]
