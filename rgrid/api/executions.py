"""Executions: create, read, follow logs, list outputs. Every query is scoped to the caller."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

from flask import Blueprint, g, jsonify, request

from rgrid.api.common import authenticate_request, enqueue_pipeline
from rgrid.api.common import context as _ctx
from rgrid.api.schemas import (
    ExecutionListQuery,
    ExecutionQuery,
    LogsQuery,
    StdinQuery,
    SubmitRequest,
    validated,
)
from rgrid.core import lifecycle, metrics
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput, NotFound, ServiceUnavailable
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.pipeline import reuse, reuse_why
from rgrid.service import cancelling
from rgrid.service import executions as svc
from rgrid.store.channels import check_env

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from rgrid.core.models import Execution
    from rgrid.pipeline.context import PipelineContext

bp = Blueprint("executions", __name__)
bp.before_request(authenticate_request)


@bp.post("/executions")
@validated(body=SubmitRequest)
def create_execution(body: SubmitRequest):
    """Submit a script: the execution is queued and returned."""
    env = check_env(body.env) if body.env else None
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        execution = svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=g.account_id,
            spec=dataclasses.replace(body.spec(), env=env),
            stdin=body.stdin,
        )
        execution_id = execution.id
        reused = reuse.at_submission(
            session,
            ctx.store,
            ctx.settings,
            execution,
            env=env,
            runtime_image=grid_image(ctx, execution.runtime),
            reuse=body.reuse,
            refresh=body.refresh,
        )
    metrics.SUBMITTED.inc()
    if reused:
        # Answered from the output cache: no worker, no sandbox, nothing queued. The answer
        # carries the log's first page too (the final one: with the outputs, small ones with
        # their bytes), so following a reused run needs no other request.
        with session_scope(ctx.session_factory) as session:
            execution = svc.get_execution(session, g.account_id, execution_id)
            answer = svc.execution_to_dict(execution)
            with contextlib.suppress(NotFound):  # lost since the check: the follower is told
                answer["log_page"] = _log_page(session, execution, ctx, 0)
            return jsonify(answer), 201
    if env:
        # Encrypted, in Redis, until the execution ends: never in the database.
        ctx.channels.put_env(execution_id, env)
    # Only now, after the commit, may a worker go looking for the row.
    try:
        enqueue_pipeline(execution_id)
    except Exception as exc:  # noqa: BLE001 - broker down: the row must not stay queued for ever
        with session_scope(ctx.session_factory) as session:
            execution = svc.get_execution(session, g.account_id, execution_id)
            if execution.status not in TERMINAL_STATUSES:  # a worker got the message after all
                lifecycle.fail(execution, "could not queue the execution: broker unavailable")
        raise ServiceUnavailable(f"could not queue the execution: {exc}") from exc
    with session_scope(ctx.session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        return jsonify(svc.execution_to_dict(execution)), 201


def grid_image(ctx, runtime: str) -> str | None:
    """The runtime image the workers last ran; Redis away: unknown, so a miss that runs."""
    try:
        return reuse.grid_runtime_image(ctx.redis, ctx.settings.queue, runtime)
    except Exception:  # noqa: BLE001 - only a lookup: the run goes on as a miss
        return None


@bp.get("/executions/<execution_id>/why")
@validated()
def why(execution_id: str):
    """Why the execution ran (or was reused): its action key compared, part by part, with
    the nearest earlier run of the same script name."""
    with session_scope(_ctx().session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        return jsonify(reuse_why.explain(session, execution))


@bp.get("/executions")
@validated(query=ExecutionListQuery)
def list_executions(query: ExecutionListQuery):
    """The caller's recent executions, newest first."""
    with session_scope(_ctx().session_factory) as session:
        rows = svc.list_executions(
            session, g.account_id, query.limit, standalone=bool(query.standalone)
        )
        return jsonify(executions=[svc.execution_to_dict(row) for row in rows])


@bp.get("/executions/<execution_id>")
@validated(query=ExecutionQuery)
def get_execution(execution_id: str, query: ExecutionQuery):
    """One execution, by id, unique id prefix or `last`. ``?check_store=1``: also whether the
    object store still has its log and outputs (``log_lost``, ``lost_outputs``)."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        result = svc.execution_to_dict(execution)
        if query.check_store:
            result.update(svc.lost_objects(session, execution, ctx.store))
        return jsonify(result)


#: The longest a log request may wait for something new (``?wait=``), and how often it looks
#: again with no news (the news itself wakes it: ``LogBuffer.changes``).
MAX_LOG_WAIT_S = 10.0
LOG_RECHECK_S = 1.0


@bp.get("/executions/<execution_id>/logs")
@validated(query=LogsQuery)
def get_logs(execution_id: str, query: LogsQuery):
    """Log chunks from ``offset``. With ``wait`` (seconds), a long poll: the answer comes as
    soon as there is something new or the execution is over, so a follower neither sleeps
    past its script's end nor asks ten times a second. The final page carries the finished
    execution and its outputs as ``GET .../outputs`` lists them, which saves the follower
    two more requests."""
    offset = query.offset
    ctx = _ctx()
    deadline = time.monotonic() + min(query.wait, MAX_LOG_WAIT_S)
    with ctx.logs.changes(execution_id) as wait_for_change:
        while True:
            with session_scope(ctx.session_factory) as session:
                execution = svc.get_execution(session, g.account_id, execution_id)
                page = _log_page(session, execution, ctx, offset)
            left = deadline - time.monotonic()
            if page["chunks"] or page["complete"] or left <= 0:
                return jsonify(page)
            wait_for_change(min(left, LOG_RECHECK_S))


def _log_page(session: Session, execution: Execution, ctx: PipelineContext, offset: int) -> dict:
    """A page of the log from ``offset``; the final one also carries the finished execution
    and its outputs as ``GET .../outputs`` lists them."""
    page = svc.read_logs(execution, ctx.logs, ctx.store, offset)
    if page["complete"]:
        page["execution"] = svc.execution_to_dict(execution)
        with contextlib.suppress(NotFound):  # then GET .../outputs says which
            listing = svc.output_listing(session, execution, ctx.store)
            svc.inline_small_outputs(listing, ctx.store, ctx.settings.inline_output_bytes)
            listing = _without_keys(listing)
            page["outputs"], page["output_packs"] = listing["outputs"], listing["packs"]
    return page


@bp.post("/executions/<execution_id>/stdin")
@validated(query=StdinQuery)
def feed_stdin(execution_id: str, query: StdinQuery):
    """One chunk of the client's piped stdin (the raw body); ``?eof=1`` ends it."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        if not execution.stdin:
            raise BadInput(f"execution {execution.id} was not submitted with stdin")
        if execution.status in TERMINAL_STATUSES:
            return jsonify(accepted=False, status=execution.status)
        execution_id = execution.id
    accepted = ctx.channels.feed_stdin(execution_id, request.get_data(), eof=query.eof == 1)
    # Not accepted: the script has not read what waits; the client sends it again shortly.
    return jsonify(accepted=accepted, status=execution.status)


@bp.post("/executions/<execution_id>/cancel")
@validated()
def cancel_execution(execution_id: str):
    """Stop an execution: at once if it has not started running, within a second if it runs
    (its worker watches the row). A finished one is left as it is: ``cancelled`` is false."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        execution_id = svc.get_execution(session, g.account_id, execution_id).id
    _status, changed = cancelling.cancel(ctx.writing(), execution_id)
    with session_scope(ctx.session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        return jsonify({**svc.execution_to_dict(execution), "cancelled": changed})


@bp.get("/executions/<execution_id>/outputs")
@validated()
def get_outputs(execution_id: str):
    """Each output file with a presigned URL to download it from, or its pack's (and where
    in the pack it is)."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        execution = svc.get_execution(session, g.account_id, execution_id)
        return jsonify(_download_listing(session, execution, ctx))


def _download_listing(session: Session, execution: Execution, ctx: PipelineContext) -> dict:
    """Each output with its presigned URL, or its pack and offset; each pack with its URL
    (the object keys stay on the server)."""
    return _without_keys(svc.output_listing(session, execution, ctx.store))


def _without_keys(listing: dict) -> dict:
    return {
        "outputs": [{k: v for k, v in o.items() if k != "key"} for o in listing["outputs"]],
        "packs": [{k: v for k, v in p.items() if k != "key"} for p in listing["packs"]],
    }
