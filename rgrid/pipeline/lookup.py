"""The cache-lookup step: whether the script cache and the dependency cache answer this
execution, on this host or on a live host its Docker steps will be sent to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rgrid.pipeline.caches import (
    cache_reads,
    dependency_row,
    environment_present,
    script_cache_environment,
)
from rgrid.pipeline.rows import execution_row, finished, has_dependencies, session_of

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def _environment_on_a_host(ctx: PipelineContext, name: str | None) -> bool:
    """Here, or on a live host the Docker steps will be sent to (the lookup itself runs on
    whichever host took it)."""
    if environment_present(ctx, name):
        return True
    if ctx.hosts is None or name is None:
        return False
    me = ctx.settings.host_name
    try:
        ctx.hosts.lost_environment(me, name)  # this host knows from its own disk
        return ctx.hosts.host_with_environment(name, exclude=me) is not None
    except Exception:  # noqa: BLE001 - Redis away: a miss, the build step will see
        return False


def cache_lookup_step(ctx: PipelineContext, execution_id: str) -> None:
    """Script cache, then dependency cache. A row whose environment neither this host nor a
    live host has is a miss (the build step installs its pins again, without resolving).
    With --refresh-deps the set is resolved again in the build step, so both are skipped."""
    with execution_row(ctx, execution_id) as execution:
        session = session_of(execution)
        if finished(execution):
            return
        deps = has_dependencies(execution)
        if deps and execution.refresh_deps:
            ctx.note(execution_id, "dependency cache skipped: --refresh-deps")
            execution.dependency_cache_hit = False
            return
        dep_row = script_row = None
        with cache_reads(ctx, execution_id, session):
            dep_row = dependency_row(session, execution) if deps else None
            script_row = script_cache_environment(session, execution)
        if dep_row is not None:
            execution.resolved_dependencies = list(dep_row.resolved)
            execution.environment = dep_row.environment
        dep_hit = dep_row is not None and _environment_on_a_host(ctx, dep_row.environment)
        execution.dependency_cache_hit = dep_hit if deps else None
        execution.script_cache_hit = (
            script_row is not None
            and (not deps or dep_hit)
            and script_row.environment == execution.environment
        )
        ctx.note(
            execution_id,
            f"script cache {'hit' if execution.script_cache_hit else 'miss'}"
            + (f" · dependency cache {'hit' if dep_hit else 'miss'}" if deps else ""),
        )
        if dep_row is not None and not dep_hit:
            ctx.note(execution_id, "the installed set is not on this host: installing its pins")
