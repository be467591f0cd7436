"""A redelivered run step following the sandbox an interrupted attempt started, so that the
script runs once: the log gets only the output it lacks, and the run its result."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from rgrid.core.models import Execution
from rgrid.host import sandbox, sandbox_container, sandbox_reattach
from rgrid.pipeline.logs import capped_log, log_incomplete
from rgrid.pipeline.watch import RunWatch
from rgrid.store.logbuffer import stored_size

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


#: The note that starts the script again after an earlier attempt's sandbox was lost: the
#: output before it belongs to that attempt (``_forwarded`` counts from the last one).
RUN_AGAIN_NOTE = "an earlier attempt of this run was interrupted and its sandbox is gone"


def _forwarded(ctx: PipelineContext, execution_id: str) -> tuple[dict[str, int], int]:
    """What the log already holds of the current sandbox's output: characters per stream,
    and their stored size (which the log cap counts)."""
    seen = {"stdout": 0, "stderr": 0}
    size = 0
    for stream, text in ctx.logs.read(execution_id):
        if stream == "system" and text.startswith(RUN_AGAIN_NOTE):
            seen, size = {"stdout": 0, "stderr": 0}, 0
        elif stream in seen:
            seen[stream] += len(text)
            size += stored_size(stream, text)
    return seen, size


def reattach(
    ctx: PipelineContext, execution: Execution, after: ExitStack
) -> tuple[sandbox.Box, bool | None, sandbox.RunResult | None, bool] | None:
    """An earlier attempt of this run step was interrupted (its pool process or its whole
    worker was killed, and Celery or the lease sweep sent it again). Its sandbox runs the
    script to the end without it, and its supervisor writes the status and keeps the
    output: follow that sandbox to its end, adding to the log only the output the log lacks,
    and take its result. None when there is nothing to follow (the script never started,
    or the sandbox is gone without a result): the caller runs the script afresh, and the
    log says so once."""
    execution_id = execution.id
    box = sandbox_reattach.find_claimed(ctx.docker, ctx.settings.sandboxes_dir, execution_id)
    if box is None:
        # Gone, or on another host (a host whose engine went away moves its runs on).
        ctx.note(execution_id, f"{RUN_AGAIN_NOTE} from this host: running the script again")
        return None
    if not (box.meta / (sandbox.STATUS_FILE + ".started")).exists():
        sandbox_container.discard(ctx.docker, box)
        ctx.note(execution_id, "an earlier attempt of this run ended before the script started")
        return None
    ctx.logs.sync(execution_id)
    seen, size = _forwarded(ctx, execution_id)
    after.callback(lambda: sandbox_container.discard(ctx.docker, box, ended=True))
    ctx.note(execution_id, "an earlier attempt of this run was interrupted: following its sandbox")
    with RunWatch(ctx, execution_id, box) as watch:
        result = sandbox_reattach.reattach(
            ctx.docker,
            box,
            timeout_s=execution.timeout_s,
            on_output=capped_log(ctx, execution_id, written=size),
            seen=seen,
            stop=watch.stopped,
        )
    if watch.cancelled:
        return box, execution.sandbox_warm, result, True
    if result is None:
        sandbox_container.discard(ctx.docker, box)
        ctx.note(execution_id, f"{RUN_AGAIN_NOTE} without a result: running the script again")
        return None
    if not result.output_kept:
        log_incomplete(
            ctx, execution_id, "output printed while no runner was reading was not all kept"
        )
    return box, execution.sandbox_warm, result, False
