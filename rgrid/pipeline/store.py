"""The store step: the log stored, then the final status published in one transaction with
the cache rows the run used touched and its result recorded for reuse."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import docker

from rgrid.core import lifecycle, metrics
from rgrid.core.models import DependencyCache, Execution, utcnow
from rgrid.core.statuses import TERMINAL_STATUSES, Status
from rgrid.host import disk, environments
from rgrid.host.runtimes import resolve_runtime
from rgrid.pipeline import reuse
from rgrid.pipeline.caches import cache_tables, dependency_row, remember_script
from rgrid.pipeline.logs import persist_logs, release
from rgrid.pipeline.rows import execution_row, has_dependencies, patiently, session_of
from rgrid.store import blobs

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def store_step(ctx: PipelineContext, execution_id: str, execution: Execution | None = None) -> None:
    """Store the log, then touch the cache rows and publish the final status in one
    transaction. ``execution``: the row as the run step just committed it (one read fewer
    on the user's path)."""
    if execution is None:
        with execution_row(ctx, execution_id) as execution:
            pass  # only read: the row as the run left it
    if execution.status in TERMINAL_STATUSES or execution.outcome is None:
        return  # over, or its run has not ended (another copy of the run step holds it)
    patiently(lambda: persist_logs(ctx, execution_id))
    published = patiently(lambda: _publish(ctx, execution_id))
    if published is None:
        return
    metrics.execution_finished(published)
    release(ctx, execution_id)
    if execution.environment:
        # Only now, with the result published: compiling beside the first run took CPU from
        # it (pandas' first run 1.96 s with the compile alongside).
        with contextlib.suppress(docker.errors.DockerException):
            environments.compile_bytecode(
                ctx.docker,
                resolve_runtime(execution.runtime).image,
                ctx.settings.environments_dir / execution.environment,
            )
    disk.after_run(ctx.settings, ctx.docker)


def _publish(ctx: PipelineContext, execution_id: str) -> Execution | None:
    """The final status, with the cache rows the run used touched in the same transaction;
    None if the execution had already ended. Called once its log is stored."""
    with execution_row(ctx, execution_id) as execution:
        session = session_of(execution)
        if execution.status in TERMINAL_STATUSES:
            return None
        ran = execution.outcome in (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT)
        if ran and execution.dependency_hash is not None:
            with cache_tables(ctx, execution_id, session):
                remember_script(session, execution)
                if has_dependencies(execution) and (row := dependency_row(session, execution)):
                    row.last_used_at = utcnow()
                    row.use_count = DependencyCache.use_count + 1
                session.flush()
            for item in execution.inputs or []:
                blob = blobs.find_blob(session, execution.account_id, item["sha256"])
                if blob is not None:
                    blobs.touch(blob)
            with cache_tables(ctx, execution_id, session):
                # The action key from what the run got; a succeeded run's outputs by it.
                reuse.record(session, ctx.settings, execution)
                session.flush()
        lifecycle.publish(execution)
        execution.log_stored = True
    return execution
