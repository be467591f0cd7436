"""The run step: the script run once in a sandbox with its inputs, its output followed into
the log, its outputs stored, and the outcome recorded for the store step to publish. A
redelivered step follows the sandbox an interrupted attempt left (``reattach``) instead of
running the script again."""

from __future__ import annotations

import contextlib
import errno
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rgrid.core import lifecycle
from rgrid.core.errors import RGridError
from rgrid.core.models import Execution
from rgrid.core.statuses import Status
from rgrid.core.units import human_limit, parse_bytes
from rgrid.host import (
    disk,
    envlocks,
    sandbox,
    sandbox_container,
    sandbox_files,
    sandbox_reattach,
    sandbox_run,
)
from rgrid.host.docker_engine import image_id
from rgrid.host.runtimes import RuntimeSpec, resolve_runtime
from rgrid.pipeline import reuse
from rgrid.pipeline.build import ensure_environment, fail_build, take_slot
from rgrid.pipeline.caches import environment_present
from rgrid.pipeline.claim import cold_box, fit_limits, memory_bytes, sandbox_for
from rgrid.pipeline.hash import script_bytes
from rgrid.pipeline.inputs import local_inputs
from rgrid.pipeline.logs import capped_log
from rgrid.pipeline.outputs import collect_and_store
from rgrid.pipeline.reattach import reattach
from rgrid.pipeline.rows import execution_row, finished, has_dependencies, update_execution
from rgrid.pipeline.watch import RunWatch, run_lock

if TYPE_CHECKING:
    from pathlib import Path

    from rgrid.pipeline.context import PipelineContext

log = logging.getLogger(__name__)


def _disk_reason(ctx: PipelineContext, path: str) -> str:
    """One line naming the limit a write hit: ``disk limit 4 GiB reached``."""
    limits = ctx.limits
    if path == "/tmp":
        return f"/tmp limit {human_limit(parse_bytes(limits.tmp_size))} reached"
    if path == sandbox.CONTAINER_HOME:
        return f"home folder limit {human_limit(parse_bytes(limits.home_size))} reached"
    return f"disk limit {human_limit(parse_bytes(limits.disk))} reached"


def _end_failed(
    ctx: PipelineContext,
    execution_id: str,
    reason: str,
    warm: bool,
    result: sandbox.RunResult | None = None,
) -> None:
    """The run went over one of its limits: ``failed``, with the limit named, no outputs."""

    def record(execution: Execution) -> None:
        lifecycle.decide(execution, Status.FAILED, reason)
        execution.sandbox_warm = warm
        if result is not None:
            execution.exit_code = result.exit_code
            execution.run_s = round(result.run_s, 3)

    update_execution(ctx, execution_id, record)
    ctx.note(execution_id, reason)


def run_step(
    ctx: PipelineContext, execution_id: str, after: ExitStack | None = None
) -> Execution | None:
    """Claim a sandbox, place the script and inputs, run it once, store what it wrote; its
    environment is held against this host's disk budget the whole time (rgrid/host/envlocks.py).
    The sandbox is removed when ``after`` closes (by default, when this step returns):
    ``run_and_store_step`` closes it once the result is published, so the user does not
    wait for the unmount and the folder's removal. Returns the row as the run left it when
    the script ran (for the store step, which then need not read it again).

    A redelivered step (its runner was killed) re-attaches to the sandbox the script was
    started in, instead of running it again (see ``reattach``)."""
    with run_lock(ctx, execution_id):
        with execution_row(ctx, execution_id) as execution:
            if finished(execution):
                return None
            if execution.cancel_requested:
                lifecycle.cancelled(execution, now=False)
                return None
        with (
            ExitStack() as own,
            envlocks.using(ctx.settings.environments_dir, execution.environment),
        ):
            return _run_step(ctx, execution, after if after is not None else own)


def _run_step(ctx: PipelineContext, execution: Execution, after: ExitStack) -> Execution | None:
    """The run step with its lock and environment held: ready the host, take the row to
    ``running``, run (or follow) the script, and record how the run ended."""
    execution_id = execution.id
    retried = execution.started_at is not None
    ready = _ready_to_run(ctx, execution)
    if ready is None:
        return None
    spec, runtime_image = ready
    execution = _start(ctx, execution_id, runtime_image)
    ctx.logs.keep(execution_id)
    attached = reattach(ctx, execution, after) if retried else None
    if attached is not None:
        box, warm, result, cancelled = attached
    else:
        box, warm, result, cancelled = _run_afresh(ctx, execution, spec.image, after)
    if cancelled:
        _end_cancelled(ctx, execution_id, warm, result)
        return None
    if result is None:
        return None  # ended already (its inputs did not fit)
    if result.full:
        # A write was refused at a limit: the run ends here, and what it left half
        # written is not stored.
        _end_failed(ctx, execution_id, _disk_reason(ctx, result.full[0]), warm, result)
        return None
    try:
        outputs = collect_and_store(ctx, execution, box, result)
    except sandbox.OutputLimitExceeded as exc:
        _end_failed(ctx, execution_id, str(exc), warm, result)
        return None
    return _record_result(ctx, execution, result, warm, outputs)


def _ready_to_run(ctx: PipelineContext, execution: Execution) -> tuple[RuntimeSpec, str] | None:
    """The runtime and its image id on this host, with the environment installed here; None
    when the execution ended instead (the install or the runtime image failed)."""
    execution_id = execution.id
    if has_dependencies(execution) and not environment_present(ctx, execution.environment):
        # Evicted since the lookup (or the lookup ran on another host): a miss, not an error.
        ctx.note(execution_id, "environment gone from this host: installing it again")
        if not ensure_environment(ctx, execution_id):
            return None
    spec = resolve_runtime(execution.runtime)
    runtime_image = image_id(ctx.docker, spec.image)
    if runtime_image is None:
        fail_build(
            ctx,
            execution_id,
            f"runtime image {spec.image} is not built on this Docker host: "
            f"run `rgrid runtime build {spec.name}`",
        )
        return None
    return spec, runtime_image


def _start(ctx: PipelineContext, execution_id: str, runtime_image: str) -> Execution:
    """The row to ``running`` on this worker (within the account's share of run slots), and
    the grid told this host has the environment and which runtime image ran it."""
    with execution_row(ctx, execution_id) as execution:
        take_slot(ctx, execution, Status.RUNNING)
        lifecycle.start_running(execution, ctx.worker_id, ctx.settings.host_name)
        execution.runtime_image = runtime_image[:80]
    ctx.warm(execution.environment)
    if ctx.hosts is not None:
        with contextlib.suppress(Exception):  # only a hint for the API's action keys
            reuse.note_runtime_image(
                ctx.hosts.client, ctx.settings.queue, execution.runtime, runtime_image[:80]
            )
    return execution


def _end_cancelled(
    ctx: PipelineContext, execution_id: str, warm: bool | None, result: sandbox.RunResult | None
) -> None:
    """The script was stopped by a cancel: ``cancelled`` is its outcome."""
    with execution_row(ctx, execution_id) as execution:
        lifecycle.cancelled(execution, now=False)
        execution.sandbox_warm = warm
        execution.run_s = round(result.run_s, 3) if result is not None else None
    ctx.note(execution_id, "cancelled: the script was stopped")


def _record_result(
    ctx: PipelineContext,
    execution: Execution,
    result: sandbox.RunResult,
    warm: bool | None,
    outputs: list[dict],
) -> Execution:
    """How the script ended, on the row with its outputs: the outcome the store step
    publishes. Returns the row committed."""
    out_of_memory = f"killed: out of memory (limit {human_limit(memory_bytes(ctx, execution))})"

    def record(execution: Execution) -> None:
        execution.sandbox_warm = warm
        execution.exit_code = result.exit_code
        execution.run_s = round(result.run_s, 3)
        execution.outputs = outputs
        if result.timed_out:
            lifecycle.decide(execution, Status.TIMED_OUT, f"timed out after {execution.timeout_s}s")
            return
        ok = result.exit_code == 0
        lifecycle.decide(
            execution,
            Status.SUCCEEDED if ok else Status.FAILED,
            out_of_memory if result.oom_killed and not ok else None,
        )
        if result.oom_killed and ok:
            # It exited 0, but the memory limit killed one of its processes: a success
            # a larger limit might not repeat, so never one to reuse.
            execution.cut_short = out_of_memory

    recorded = update_execution(ctx, execution.id, record)
    if result.timed_out:
        ctx.note(execution.id, f"timed out after {execution.timeout_s}s")
    elif result.oom_killed and result.exit_code != 0:
        ctx.note(execution.id, out_of_memory)
    return recorded


@dataclass
class _Attempt:
    """The sandbox a fresh run is in (a retry swaps it) and what it gave."""

    box: sandbox.Box
    warm: bool
    result: sandbox.RunResult | None = None
    cancelled: bool = False


def _run_afresh(
    ctx: PipelineContext, execution: Execution, image: str, after: ExitStack
) -> tuple[sandbox.Box, bool, sandbox.RunResult | None, bool]:
    """Claim a sandbox and run the script in it: (sandbox, warm, result, cancelled). The
    result is None when the run ended before the script started (inputs over the disk)."""
    execution_id = execution.id
    script = script_bytes(ctx, execution)
    inputs = local_inputs(ctx, execution)
    disk.touch_all(path for _, path in inputs)
    files: list[tuple[str, bytes | Path]] = [(execution.script_name, script), *inputs]
    env = sandbox.Environment(
        image=image,
        deps_dir=(ctx.settings.environments_dir / execution.environment)
        if execution.environment
        else None,
    )
    env_vars = ctx.channels.get_env(execution_id) if execution.env_names else None
    if execution.env_names and env_vars is None:
        raise RGridError("the execution's environment variables expired before it could run")
    run = _Attempt(*sandbox_for(ctx, env, execution_id, execution.timeout_s, after))
    sandbox_reattach.mark_claimed(run.box, execution_id)
    # Late-bound: the sandbox the run ended in (a retry swaps it), and whether it said so.
    after.callback(
        lambda: sandbox_container.discard(
            ctx.docker, run.box, ended=run.result is not None and run.result.ended
        )
    )
    fit_limits(ctx, execution, run.box)
    try:
        sandbox_files.place_files(run.box, files, ctx.limits)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        _end_failed(ctx, execution_id, _disk_reason(ctx, "/work") + " by the inputs", run.warm)
        return run.box, run.warm, None, False
    if execution.inputs:
        ctx.note(execution_id, f"placed {len(execution.inputs)} input file(s) in /work")
    _run_script(ctx, execution, env, env_vars, files, run)
    return run.box, run.warm, run.result, run.cancelled


def _run_script(
    ctx: PipelineContext,
    execution: Execution,
    env: sandbox.Environment,
    env_vars: dict[str, str] | None,
    files: list[tuple[str, bytes | Path]],
    run: _Attempt,
) -> None:
    """Run the script in ``run.box`` once, watched; a sandbox that never started it is
    replaced by a fresh one, once (the script never ran there, so it still runs once)."""
    execution_id = execution.id
    entry = ["-m", execution.module] if execution.module else [f"/work/{execution.script_name}"]
    argv = ["python3", *entry, *(execution.args or [])]
    for attempt in (1, 2):
        try:
            with RunWatch(ctx, execution_id, run.box) as watch:
                run.result = sandbox_run.run(
                    ctx.docker,
                    run.box,
                    env,
                    argv=argv,
                    timeout_s=execution.timeout_s,
                    on_output=capped_log(ctx, execution_id),
                    env_vars=env_vars,
                    stdin=ctx.channels.stdin(execution_id) if execution.stdin else None,
                    cpus=execution.cpus or ctx.limits.cpus,
                    keep_output_bytes=ctx.settings.max_log_bytes,
                )
            run.cancelled = watch.cancelled
            return
        except sandbox.SandboxUnresponsive as exc:
            if attempt == 2:
                raise RGridError(str(exc)) from exc
            log.warning("%s: %s", execution_id, exc)
            ctx.note(execution_id, "the sandbox did not start the script: using a fresh one")
            sandbox_container.discard(ctx.docker, run.box)
            run.box, run.warm = cold_box(ctx, env, execution_id, execution.timeout_s), False
            sandbox_reattach.mark_claimed(run.box, execution_id)
            fit_limits(ctx, execution, run.box)
            sandbox_files.place_files(run.box, files, ctx.limits)
