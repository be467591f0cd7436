"""What every blueprint shares: the services, the caller's account, the request body and the
queue."""

from __future__ import annotations

from flask import current_app, g, request

from rgrid.core import queueing
from rgrid.core.db import session_scope
from rgrid.service.accounts import authenticate
from rgrid.service.context import Services

#: The most a request body may hold (a 1 MiB script as JSON, with escaping, and the rest).
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def context() -> Services:
    return current_app.extensions["rgrid"]


def enqueue_pipeline(execution_id: str) -> None:
    """Queue an execution's chain by task name (see rgrid/core/queueing.py)."""
    queueing.enqueue_pipeline(current_app.extensions["rgrid.celery"], execution_id)


def authenticate_request() -> None:
    """Every row a request touches is then scoped to ``g.account_id``."""
    header = request.headers.get("Authorization", "")
    secret = header[7:].strip() if header.lower().startswith("bearer ") else None
    with session_scope(context().session_factory) as session:
        g.account_id = authenticate(session, secret)
