"""The hash step: the script's bytes read and verified against their hash (from this host's
copy when it has one), and the dependency hash computed from the stored requirements."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rgrid.core import cache_keys
from rgrid.core.errors import RGridError
from rgrid.core.hashing import script_hash
from rgrid.core.lifecycle import decide
from rgrid.core.models import Execution
from rgrid.core.statuses import Status
from rgrid.host import disk
from rgrid.host.requirements import dependency_hash, normalise
from rgrid.pipeline.rows import execution_row, finished, has_dependencies

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def script_bytes(ctx: PipelineContext, execution: Execution) -> bytes:
    """The script, verified against its hash, from this host's local copy when it has one (a
    script cache hit fetches nothing), else from the object store."""
    local = ctx.settings.blob_cache_dir / cache_keys.script_local_name(
        execution.account_id, execution.script_hash
    )
    if local.is_file():
        data = local.read_bytes()
        if script_hash(data) == execution.script_hash:
            disk.touch(local)
            return data
    data = ctx.store.get_bytes(
        cache_keys.script_object_key(execution.account_id, execution.script_hash)
    )
    if script_hash(data) != execution.script_hash:
        raise RGridError("stored script does not match its hash")
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f"{local.name}.{execution.id}.part")
    partial.write_bytes(data)
    partial.replace(local)
    return data


def hash_step(ctx: PipelineContext, execution_id: str) -> None:
    """Recompute the hashes from the stored content: never trust the submitter's word."""
    with execution_row(ctx, execution_id) as execution:
        if finished(execution):
            return
        try:
            script_bytes(ctx, execution)
        except RGridError as exc:
            decide(execution, Status.ERROR, exc.message)
            return
        execution.dependency_hash = dependency_hash(normalise(execution.requirements or ""))
        if execution.dependency_source and has_dependencies(execution):
            ctx.note(execution_id, f"dependencies from {execution.dependency_source}")
