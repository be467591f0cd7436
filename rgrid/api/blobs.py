"""Blobs: which digests the caller lacks, and presigned uploads checked before they count.

Bytes never pass through the API: the CLI sends them to the object store with presigned URLs,
and the API only hashes what arrived (a digest is a promise) before a blob row points at it.
"""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from rgrid.api.common import MAX_REQUEST_BYTES, authenticate_request, context
from rgrid.api.schemas import CompleteUploadRequest, MissingRequest, UploadRequest, validated
from rgrid.core.db import session_scope
from rgrid.core.errors import RGridError
from rgrid.store import blobs, uploads
from rgrid.store.objectstore import PresigningStore

bp = Blueprint("blobs", __name__)
bp.before_request(authenticate_request)


def _presigning_store() -> PresigningStore:
    store = context().store
    if not isinstance(store, PresigningStore):
        raise RGridError("this server's object store cannot take presigned uploads")
    return store


@bp.post("/blobs/missing")
@validated(body=MissingRequest)
def missing(body: MissingRequest):
    """Which of these digests the caller has no stored copy of, and how many bytes of them
    a submission may carry inline (``inline``) instead of uploading each."""
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        found = blobs.missing_digests(
            session, ctx.store, g.account_id, body.digests, ctx.settings.blob_presence_ttl_s
        )
        return jsonify(missing=found, inline_bytes=inline_budget(ctx.settings.inline_upload_bytes))


def inline_budget(setting: int) -> int:
    """What a submission may carry inline: the operator's setting, within a quarter of the
    request size limit (base64 adds a third, and the script itself may be 1 MiB)."""
    return max(0, min(setting, MAX_REQUEST_BYTES // 4))


@bp.post("/uploads")
@validated(body=UploadRequest)
def start_upload(body: UploadRequest):
    """Where to send a file's bytes: presigned URLs for one PUT or for its parts."""
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        result = uploads.start_upload(
            session,
            _presigning_store(),
            ctx.settings,
            g.account_id,
            body.sha256,
            body.size,
        )
    return jsonify(result), 201


@bp.post("/uploads/<upload_id>/complete")
@validated(body=CompleteUploadRequest)
def complete_upload(upload_id: str, body: CompleteUploadRequest):
    """The bytes are there: check their digest, then the blob counts."""
    parts = [part.model_dump() for part in body.parts]
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        blob = uploads.complete_upload(session, _presigning_store(), g.account_id, upload_id, parts)
        return jsonify(sha256=blob.digest, size=blob.size)
