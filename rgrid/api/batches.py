"""Batches: create one, add its inputs in pages, start, follow, cancel, retry.

Why pages rather than one request with every input: a 10,000-input batch in one JSON body is
the whole batch in the memory of the CLI and of the API at once, and one long transaction.
In pages of at most 1,000 (each its own short transaction) neither side ever holds more than
a page, and nothing runs until ``start``: a batch of up to 1,000 inputs is still one
transaction of executions, and any batch is one enqueue pass after its start commits.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify
from prometheus_client import Counter

from rgrid.api.common import authenticate_request
from rgrid.api.common import context as _ctx
from rgrid.api.executions import grid_image
from rgrid.api.schemas import (
    BatchExecutionsQuery,
    BatchInputsRequest,
    BatchRequest,
    ListQuery,
    validated,
)
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput, RGridError, ServiceUnavailable
from rgrid.core.queueing import enqueue_pipeline
from rgrid.service import batch_retry, cancelling
from rgrid.service import batch_views as views
from rgrid.service import batches as svc

bp = Blueprint("batches", __name__)
bp.before_request(authenticate_request)

BATCH_EXECUTIONS = Counter(
    "rgrid_batch_executions_submitted_total", "Executions added to batches by the API"
)


def _enqueue(execution_id: str) -> None:
    enqueue_pipeline(current_app.extensions["rgrid.celery"], execution_id)


def _status(batch_id: str):
    with session_scope(_ctx().session_factory) as session:
        batch = views.get_batch(session, g.account_id, batch_id)
        return views.batch_to_dict(session, batch)


def _batch_id(batch_id: str) -> str:
    """The full id of one of the caller's batches (from a prefix or ``last``)."""
    with session_scope(_ctx().session_factory) as session:
        return views.get_batch(session, g.account_id, batch_id).id


@bp.post("/batches")
@validated(body=BatchRequest)
def create_batch(body: BatchRequest):
    """Create a batch: one script and the options its executions share."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        batch = svc.create_batch(
            session,
            ctx.store,
            ctx.settings,
            account_id=g.account_id,
            spec=body.spec(),
            parallel=body.parallel,
            size=body.size,
        )
        return jsonify(views.batch_to_dict(session, batch)), 201


@bp.post("/batches/<batch_id>/inputs")
@validated(body=BatchInputsRequest)
def add_inputs(batch_id: str, body: BatchInputsRequest):
    """Add a page of inputs to a batch that has not started: one execution each."""
    ctx = _ctx()
    with session_scope(ctx.session_factory) as session:
        batch = views.get_batch(session, g.account_id, batch_id)
        added = svc.add_page(
            session,
            ctx.settings,
            g.account_id,
            batch.id,
            [item.model_dump() for item in body.inputs],
            store=ctx.store,
            runtime_image=lambda runtime: grid_image(ctx, runtime),
        )
    BATCH_EXECUTIONS.inc(len(body.inputs))
    # ``reused``: how many of this page were answered from the output cache at once.
    return jsonify(batch_id=batch.id, total=added["total"], reused=added["reused"])


@bp.post("/batches/<batch_id>/start")
@validated()
def start_batch(batch_id: str):
    """Start a batch: no more inputs; its executions are queued (at most `parallel` at once)."""
    full_id = _batch_id(batch_id)
    try:
        svc.start(_ctx().session_factory, g.account_id, full_id, _enqueue)
    except RGridError:
        raise
    except Exception as exc:  # noqa: BLE001 - the batch is started; beat hands on the rest
        current_app.logger.warning("could not queue batch %s: %s", full_id, exc)
        raise ServiceUnavailable(f"could not queue the batch's executions: {exc}") from exc
    return jsonify(_status(full_id))


@bp.get("/batches")
@validated(query=ListQuery)
def list_batches(query: ListQuery):
    """The caller's recent batches, newest first, with counts per status."""
    with session_scope(_ctx().session_factory) as session:
        rows = views.list_batches(session, g.account_id, query.limit)
        return jsonify(batches=[views.batch_to_dict(session, row) for row in rows])


@bp.get("/batches/<batch_id>")
@validated()
def get_batch(batch_id: str):
    """A batch with its executions counted per status (from their rows)."""
    return jsonify(_status(batch_id))


@bp.get("/batches/<batch_id>/executions")
@validated(query=BatchExecutionsQuery)
def batch_executions(batch_id: str, query: BatchExecutionsQuery):
    """A page of a batch's executions: by id, or those finished since a time."""
    since = None
    if query.finished_since is not None:
        try:
            since = datetime.fromisoformat(query.finished_since)
        except ValueError:
            raise BadInput("finished_since: not an ISO 8601 time") from None
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
    with session_scope(_ctx().session_factory) as session:
        batch = views.get_batch(session, g.account_id, batch_id)
        rows = views.executions_page(
            session, batch, after=query.after, finished_since=since, limit=query.limit
        )
        return jsonify(batch_id=batch.id, executions=rows)


@bp.post("/batches/<batch_id>/cancel")
@validated()
def cancel_batch(batch_id: str):
    """Cancel a batch: every queued and running execution of it ends `cancelled`."""
    ctx = _ctx()
    full_id = _batch_id(batch_id)
    writing = ctx.writing()
    stopped = svc.cancel(
        ctx.session_factory,
        g.account_id,
        full_id,
        lambda execution_id: cancelling.cancel(writing, execution_id),
        release=lambda execution_id: cancelling.forget(writing, execution_id),
    )
    return jsonify({**_status(full_id), "stopped": stopped})


@bp.post("/batches/<batch_id>/retry")
@validated()
def retry_batch(batch_id: str):
    """Run the batch's failed executions again (successes are not run again)."""
    ctx = _ctx()
    full_id = _batch_id(batch_id)
    retried = batch_retry.retry(ctx.session_factory, g.account_id, full_id, _enqueue, ctx.settings)
    return jsonify(
        {**_status(full_id), "retried": list(retried), "new_executions": list(retried.values())}
    )
