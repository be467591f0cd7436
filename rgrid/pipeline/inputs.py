"""An execution's input and source files as verified local copies from this host's blob
cache, fetched several at a time from the object store when missing."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from rgrid.core.db import session_scope
from rgrid.core.errors import NotFound, RGridError
from rgrid.core.models import Execution
from rgrid.store import blobs

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def local_inputs(ctx: PipelineContext, execution: Execution) -> list[tuple[str, Path]]:
    """Each input as (name in /work, verified local copy from this host's blob cache)."""
    keys = {}
    # The shipped modules are placed as inputs are (content-addressed, verified), but are
    # no script arguments.
    files = [*(execution.sources or []), *(execution.inputs or [])]
    if files:
        # One query for all of them: a project ships tens of modules.
        with session_scope(ctx.session_factory) as session:
            keys = blobs.blob_locations(session, execution.account_id, [i["sha256"] for i in files])
    for item in files:
        if item["sha256"] not in keys:
            raise RGridError(f"input {item['path']} is no longer stored; run again to upload it")
    # This host's content-addressed copies (per account) are the tree: an unchanged module
    # is never fetched again, and what is not here yet is fetched several at a time.
    cache_dir = ctx.settings.blob_cache_dir / str(execution.account_id)
    digests = list(dict.fromkeys(item["sha256"] for item in files))

    def local(digest: str) -> Path:
        key, pack_offset, size = keys[digest]
        try:
            return blobs.cached_copy(ctx.store, key, digest, cache_dir, pack_offset, size)
        except NotFound:
            _forget_lost_blob(ctx, execution.account_id, digest, key)
            name = next(item["path"] for item in files if item["sha256"] == digest)
            raise RGridError(f"input {name} is no longer stored; run again to upload it") from None

    if sum(1 for d in digests if not blobs.cached_path(cache_dir, d).is_file()) > 1:
        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rgrid-fetch") as fetchers:
            copies = dict(zip(digests, fetchers.map(local, digests), strict=True))
    else:
        copies = {digest: local(digest) for digest in digests}
    return [(item["path"], copies[item["sha256"]]) for item in files]


#: Input and source files fetched from the object store at once, for those this host lacks.
FETCH_THREADS = 8


def _forget_lost_blob(ctx: PipelineContext, account_id: int, digest: str, key: str) -> None:
    """The store lost a blob's bytes: drop its row, so that the next run uploads it again."""
    blobs.forget_presence(key)
    with contextlib.suppress(Exception), session_scope(ctx.session_factory) as session:
        blob = blobs.find_blob(session, account_id, digest)
        if blob is not None and blob.object_key == key:
            session.delete(blob)
