"""The build step: the execution's dependency set installed on this host unless it is there,
once per key across the grid (a set never resolved is resolved by one host; one resolved
before is installed from its pins by each host that lacks it). Nothing is built for the
script: it reaches its sandbox as a file."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rgrid.core import cache_keys, lifecycle, metrics
from rgrid.core.errors import BadInput, BuildError
from rgrid.core.models import DependencyCache, Execution
from rgrid.core.statuses import Status
from rgrid.host import dependencies, environments, indexes, pool, sandbox, slots
from rgrid.host.runtimes import RuntimeSpec, resolve_runtime
from rgrid.pipeline.caches import cache_tables, dependency_row, environment_present
from rgrid.pipeline.rows import (
    execution_row,
    finished,
    has_dependencies,
    optional_row,
    session_of,
)

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def take_slot(ctx: PipelineContext, execution: Execution, to: Status) -> None:
    """Move to ``to`` (``building``: a build slot; ``running``: a run slot) only within the
    account's fair share of that kind's slots on the live hosts (raises
    ``slots.AccountBusy``, before anything is done, otherwise)."""
    if ctx.embedded:
        return  # one user's own machine: nobody else's work to wait for
    session = session_of(execution)
    settings = ctx.settings
    per_host = settings.build_concurrency if to == Status.BUILDING else settings.worker_concurrency
    hosts_live = len(ctx.hosts.live_hosts()) if ctx.hosts is not None else 0
    slots.take_slot(
        session, execution, to, per_host * max(1, hosts_live), settings.max_concurrent_per_account
    )


def fail_build(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """A failed build ends the execution; no cache row is written, so fixing and rerunning works."""
    with execution_row(ctx, execution_id) as execution:
        lifecycle.decide(execution, Status.BUILD_FAILED, message)
    ctx.note(execution_id, message)


def ensure_environment(ctx: PipelineContext, execution_id: str) -> bool:
    """Install the execution's dependency set on this host unless it is there, once per key
    across the grid. Returns False when the install failed (the execution is then over)."""
    with metrics.ENVIRONMENT_BUILD.time():
        return _provide_environment(ctx, execution_id)


@dataclass(frozen=True)
class _Plan:
    """What to install, read under the build lock."""

    requirements: str
    account_id: int
    refresh: bool
    #: The pins of a set resolved before; None: resolve it.
    pinned: list[str] | None
    #: Another host resolved the set while this one waited for the grid-wide lock.
    resolved_meanwhile: bool


def _provide_environment(ctx: PipelineContext, execution_id: str) -> bool:
    spec, lock, known = _build_lock(ctx, execution_id)
    with ExitStack() as held:
        held.enter_context(ctx.locks.hold(lock, ctx.settings.build_lock_timeout_s))
        plan = _plan(ctx, execution_id, known)
        if plan is None:
            return True
        if plan.resolved_meanwhile:
            # Another host resolved the set while we waited for the grid-wide lock: install
            # its pins under this host's lock instead, which this host's other builders of
            # the set take (with a build pool per host, several wait at once).
            held.close()
            return _provide_environment(ctx, execution_id)
        installed = _install(ctx, execution_id, spec, plan)
        if installed is None:
            return False
        _record_installed(ctx, execution_id, installed)
    _installed(ctx, execution_id, spec, installed)
    return True


def _build_lock(ctx: PipelineContext, execution_id: str) -> tuple[RuntimeSpec, str, bool]:
    """The runtime, the lock to build under, and whether the set was resolved before.

    A set resolved before (its pins are in the dependency cache) only needs installing on
    this host: a lock per host, so hosts install it side by side. A set never resolved
    takes the grid-wide lock, so it is resolved once."""
    with execution_row(ctx, execution_id) as execution:
        spec = resolve_runtime(execution.runtime)
        key = cache_keys.dependency_cache_key(
            execution.account_id, execution.runtime, execution.dependency_hash or ""
        )
        session = session_of(execution)
        known = None
        with cache_tables(ctx, execution_id, session):
            known = dependency_row(session, execution)
        lock = cache_keys.build_lock_name(key)
        if known is not None and not execution.refresh_deps:
            lock = cache_keys.host_build_lock_name(key, ctx.settings.host_name)
    return spec, lock, known is not None


def _plan(ctx: PipelineContext, execution_id: str, known: bool) -> _Plan | None:
    """Under the lock: None when another builder finished this set while we waited for it
    (the execution then uses theirs), else what to install."""
    with execution_row(ctx, execution_id) as execution:
        session = session_of(execution)
        row = None
        with cache_tables(ctx, execution_id, session):
            row = dependency_row(session, execution)
        refresh = execution.refresh_deps
        if row is not None and not refresh and environment_present(ctx, row.environment):
            execution.environment = row.environment
            execution.resolved_dependencies = list(row.resolved)
            ctx.note(execution_id, "installed by a concurrent run: dependency cache hit")
            ctx.warm(row.environment)
            return None
        return _Plan(
            requirements=execution.requirements,
            account_id=execution.account_id,
            refresh=refresh,
            pinned=list(row.resolved) if row is not None and not refresh else None,
            resolved_meanwhile=not known and row is not None and not refresh,
        )


def _install(
    ctx: PipelineContext, execution_id: str, spec: RuntimeSpec, plan: _Plan
) -> environments.Installed | None:
    """Install the set (None: the build failed, and the execution with it)."""
    requirements = plan.requirements
    if not ctx.embedded:
        try:  # checked at submission too; the operator's list may have changed since
            dependencies.check_sources(ctx.settings, requirements)
        except BadInput as exc:
            fail_build(ctx, execution_id, exc.message)
            return None
    count = sum(1 for line in requirements.splitlines() if not line.startswith("-"))
    if plan.pinned is None and dependencies.is_locked(requirements):
        ctx.phase(execution_id, f"installing {count} locked package(s), nothing to resolve")
    elif plan.pinned is None:
        ctx.phase(execution_id, f"resolving and installing {count} requirement(s)")
    else:
        ctx.phase(execution_id, f"installing {len(plan.pinned)} package(s)")
    try:
        installed = environments.install(
            ctx.settings.environments_dir,
            account_id=plan.account_id,
            spec=spec,
            requirements=requirements,
            uv_cache_dir=dependencies.uv_cache_for(
                ctx.settings, plan.account_id, requirements, embedded=ctx.embedded
            ),
            log=ctx.detail(execution_id)
            if ctx.embedded
            else indexes.without_downloads(ctx.detail(execution_id)),
            pinned=plan.pinned,
            refresh=plan.refresh,
            deadline_s=ctx.settings.build_timeout_s,
        )
    except BuildError as exc:
        fail_build(ctx, execution_id, exc.message)
        return None
    metrics.ENVIRONMENT_INSTALL.observe(installed.install_s)
    return installed


def _record_installed(
    ctx: PipelineContext, execution_id: str, installed: environments.Installed
) -> None:
    """The installed set in the dependency cache and on the execution's row."""
    with execution_row(ctx, execution_id) as execution:
        session = session_of(execution)
        with cache_tables(ctx, execution_id, session):
            row = dependency_row(session, execution)
            if row is None:
                row = DependencyCache(
                    account_id=execution.account_id,
                    runtime=execution.runtime,
                    dependency_hash=execution.dependency_hash,
                    use_count=0,
                )
                session.add(row)
            row.environment, row.resolved = installed.name, installed.pinned
            session.flush()
        execution.environment = installed.name
        execution.resolved_dependencies = installed.pinned
        execution.deps_build_s = installed.install_s


def _installed(
    ctx: PipelineContext, execution_id: str, spec: RuntimeSpec, installed: environments.Installed
) -> None:
    """Say what was installed, tell the grid this host has it, and retire sandboxes warmed
    for an earlier folder of this name (they still mount the removed one)."""
    summary = f"installed {len(installed.pinned)} package(s) in {installed.install_s:.2f}s"
    ctx.note(execution_id, summary if installed.name else "the requirements install nothing")
    if installed.name:
        ctx.warm(installed.name)
        deps_dir = ctx.settings.environments_dir / installed.name
        env = sandbox.Environment(spec.image, deps_dir)
        pool.retire_all(ctx.docker, env, ctx.limits, ctx.pool)


def build_installs(ctx: PipelineContext, execution_id: str) -> bool:
    """Whether the build step would install a dependency set on this host (the worker
    hands such a build to the host's build pool; any other is done at once in the run
    pool)."""
    with optional_row(ctx, execution_id) as execution:
        if execution is None or finished(execution) or not has_dependencies(execution):
            return False
        return not (
            execution.dependency_cache_hit and environment_present(ctx, execution.environment)
        )


def build_step(ctx: PipelineContext, execution_id: str) -> None:
    """Install the dependency set if this host lacks it. Nothing is built for the script."""
    with execution_row(ctx, execution_id) as execution:
        if finished(execution) or not has_dependencies(execution):
            return
        if execution.dependency_cache_hit and environment_present(ctx, execution.environment):
            return
        if execution.status == Status.QUEUED:
            take_slot(ctx, execution, Status.BUILDING)
            lifecycle.move(execution, Status.BUILDING)
    ctx.logs.keep(execution_id)
    ensure_environment(ctx, execution_id)
