"""Blobs: which digests the caller lacks, and presigned uploads checked before they count.

Bytes never pass through the API: the CLI sends them to the object store with presigned URLs,
and the API only hashes what arrived (a digest is a promise) before a blob row points at it.
"""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from rgrid import blobs
from rgrid.api.common import authenticate_request, context, json_body
from rgrid.db import session_scope
from rgrid.errors import BadInput, RGridError
from rgrid.objectstore import PresigningStore

bp = Blueprint("blobs", __name__)
bp.before_request(authenticate_request)


def _presigning_store() -> PresigningStore:
    store = context().store
    if not isinstance(store, PresigningStore):
        raise RGridError("this server's object store cannot take presigned uploads")
    return store


@bp.post("/blobs/missing")
def missing():
    digests = json_body().get("digests")
    if not isinstance(digests, list):
        raise BadInput("'digests' must be a list of sha256 hex digests")
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        return jsonify(missing=blobs.missing_digests(session, ctx.store, g.account_id, digests))


@bp.post("/uploads")
def start_upload():
    body = json_body()
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        result = blobs.start_upload(
            session,
            _presigning_store(),
            ctx.settings,
            g.account_id,
            body.get("sha256"),
            body.get("size"),
        )
    return jsonify(result), 201


@bp.post("/uploads/<upload_id>/complete")
def complete_upload(upload_id: str):
    parts = json_body().get("parts")
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        blob = blobs.complete_upload(session, _presigning_store(), g.account_id, upload_id, parts)
        return jsonify(sha256=blob.digest, size=blob.size)
