"""The caller's own caches: hit rates, entries, and purging them (`rgrid cache ...`)."""

from __future__ import annotations

import json

from flask import Blueprint, g, jsonify

from rgrid.api.common import authenticate_request, context
from rgrid.api.schemas import CacheEntriesQuery, CachePurgeRequest, validated
from rgrid.core import cache_keys, cachestats
from rgrid.core.db import session_scope
from rgrid.service import purge

bp = Blueprint("cache", __name__)
bp.before_request(authenticate_request)


def last_purge() -> dict | None:
    """When the nightly purge last ran and what it removed in all (not per account)."""
    ctx = context()
    raw = ctx.redis.get(cache_keys.last_purge_key(ctx.settings.queue))
    if not raw:
        return None
    record = json.loads(raw)
    return {"finished_at": record.get("finished_at"), "removed": record.get("shared", {})}


@bp.get("/cache/stats")
@validated()
def stats():
    """Hit rates per cache type over 1, 7 and 30 days, entries, bytes, oldest, last purge."""
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        return jsonify(cachestats.stats(session, g.account_id, last_purge()))


@bp.get("/cache/entries")
@validated(query=CacheEntriesQuery)
def entries(query: CacheEntriesQuery):
    """The caller's cache entries, most recently used first."""
    with session_scope(context().session_factory) as session:
        return jsonify(entries=cachestats.entries(session, g.account_id, query.limit))


@bp.post("/cache/purge")
@validated(body=CachePurgeRequest)
def purge_entries(body: CachePurgeRequest):
    """Remove the caller's entries unused for ``older_than_s`` (or all of them): a purged entry
    is a miss next time."""
    age = purge.purge_age(body.older_than_s, body.all)
    ctx = context()
    with session_scope(ctx.session_factory) as session:
        removed = purge.purge_account(session, ctx.store, g.account_id, age)
    return jsonify(removed=removed)
