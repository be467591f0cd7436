"""What every authenticated blueprint shares: the caller's account and the request body."""

from __future__ import annotations

from flask import current_app, g, request

from rgrid.accounts import authenticate
from rgrid.db import session_scope
from rgrid.errors import BadInput
from rgrid.pipeline import PipelineContext


def context() -> PipelineContext:
    return current_app.extensions["rgrid"]


def authenticate_request() -> None:
    """Every row a request touches is then scoped to ``g.account_id``."""
    header = request.headers.get("Authorization", "")
    secret = header[7:].strip() if header.lower().startswith("bearer ") else None
    with session_scope(context().session_factory) as session:
        g.account_id = authenticate(session, secret).id


def json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object")
    return body
