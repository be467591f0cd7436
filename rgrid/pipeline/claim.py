"""The sandbox a run gets: a warm one claimed from this host's pool, else one started now,
fitted to the run's own memory and CPUs; and the pool filled when a worker starts."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from rgrid.core import metrics
from rgrid.core.models import Execution
from rgrid.core.units import parse_bytes
from rgrid.host import pool, sandbox, sandbox_container
from rgrid.host.docker_engine import image_id
from rgrid.host.runtimes import resolve_runtime

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def cold_box(
    ctx: PipelineContext, env: sandbox.Environment, execution_id: str, timeout_s: int
) -> sandbox.Box:
    """A sandbox started now, for one execution (none was warm, or the warm one failed)."""
    return sandbox_container.start_box(
        ctx.docker,
        env,
        ctx.limits,
        root=ctx.settings.sandboxes_dir,
        idle_s=ctx.settings.pool_idle_s,
        name=f"{sandbox.RUN_NAME_PREFIX}{execution_id}",
        labels=sandbox_container.execution_labels(execution_id, timeout_s),
    )


def sandbox_for(
    ctx: PipelineContext,
    env: sandbox.Environment,
    execution_id: str,
    timeout_s: int,
    after: ExitStack,
) -> tuple[sandbox.Box, bool]:
    """A warm sandbox from the pool if one is free, else one started now; either way the pool
    is refilled in the background. Returns (sandbox, whether it was warm).

    The refill starts a container, about 0.3 s of the engine's CPU: beside the script, on a
    2-core host, it slowed a numpy import by half. So while a spare warm sandbox is left
    for the next run, the refill waits until ``after`` closes (the result published);
    only a pool this run emptied is refilled at once, so that the next run is warm."""
    limits = ctx.limits
    box, spares = pool.claim_counting_spares(ctx.docker, env, limits, ctx.pool, execution_id)
    warm = box is not None
    (metrics.POOL_CLAIMS if warm else metrics.POOL_MISSES).inc()

    def refill() -> None:
        ctx.background[:] = [t for t in ctx.background if t.is_alive()]
        ctx.background.append(pool.fill_in_background(ctx.docker, env, limits, ctx.pool))

    if box is None:
        ctx.phase(execution_id, "starting a sandbox")
        box = cold_box(ctx, env, execution_id, timeout_s)
    if spares:
        after.callback(refill)
    else:
        refill()
    return box, warm


def memory_bytes(ctx: PipelineContext, execution: Execution) -> int:
    return execution.memory_bytes or parse_bytes(ctx.limits.memory)


def fit_limits(ctx: PipelineContext, execution: Execution, box: sandbox.Box) -> None:
    """A run that chose its own memory or CPUs gets them on the sandbox it claimed."""
    memory, cpus = memory_bytes(ctx, execution), execution.cpus or ctx.limits.cpus
    if memory != parse_bytes(ctx.limits.memory) or cpus != ctx.limits.cpus:
        sandbox_container.resize(ctx.docker, box, memory, cpus)


def warm_up(ctx: PipelineContext, runtime: str) -> int:
    """Fill the pool for a runtime with no dependencies (a worker starting up); returns how
    many sandboxes were started. Also clears host folders of sandboxes that are gone."""
    spec = resolve_runtime(runtime)
    if image_id(ctx.docker, spec.image) is None:
        return 0
    pool.sweep_folders(ctx.docker, ctx.settings.sandboxes_dir)
    return pool.fill(ctx.docker, sandbox.Environment(image=spec.image), ctx.limits, ctx.pool)
