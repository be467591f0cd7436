"""Submitting and reading executions, for the API and the embedded default alike."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid import cache_keys
from rgrid.blobs import find_blob
from rgrid.config import Settings
from rgrid.errors import BadInput, NotFound
from rgrid.hashing import script_hash
from rgrid.inputs import OUTPUTS_DIR, check_manifest
from rgrid.logbuffer import LogBuffer, LogChunk, decode_log
from rgrid.models import Execution
from rgrid.objectstore import ObjectStore
from rgrid.requirements import check_local_paths, inline_requirements, normalise
from rgrid.runtimes import DEFAULT_RUNTIME, resolve_runtime
from rgrid.statuses import TERMINAL_STATUSES


def new_execution_id() -> str:
    return secrets.token_hex(8)


def validate_submission(
    settings: Settings, script: str, script_name: str, runtime: str, timeout_s: int | None
) -> int:
    """Check what a user sent; returns the timeout to use."""
    if len(script.encode()) > settings.max_script_bytes:
        raise BadInput(f"script is larger than {settings.max_script_bytes} bytes")
    if (
        not script_name
        or "/" in script_name
        or script_name in (".", "..", OUTPUTS_DIR)
        or any(ord(c) < 32 for c in script_name)
    ):
        raise BadInput(f"bad script name {script_name!r}")
    resolve_runtime(runtime)
    if timeout_s is None:
        return settings.default_timeout_s
    if not 1 <= timeout_s <= settings.max_timeout_s:
        raise BadInput(f"timeout must be between 1 and {settings.max_timeout_s} seconds")
    return timeout_s


def requirements_for(script: str, requirements: str | None, runtime: str) -> str:
    """The normalised requirements, from a requirements text or the script's PEP 723 block."""
    inline = inline_requirements(script, resolve_runtime(runtime).python_version)
    if requirements is not None and inline is not None:
        raise BadInput(
            "the script has inline '# /// script' dependencies and -r was given: use one of them"
        )
    return normalise(requirements if requirements is not None else inline or "")


def create_execution(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    *,
    account_id: int,
    script: str,
    script_name: str,
    runtime: str = DEFAULT_RUNTIME,
    timeout_s: int | None = None,
    args: list[str] | None = None,
    requirements: str | None = None,
    refresh_deps: bool = False,
    inputs: list[dict] | None = None,
    files_uploaded: int = 0,
    bytes_uploaded: int = 0,
) -> Execution:
    """Store the script (content-addressed) and write the execution row; the caller commits and
    only then enqueues the pipeline. Inputs must already be stored blobs of this account."""
    timeout = validate_submission(settings, script, script_name, runtime, timeout_s)
    normalised = requirements_for(script, requirements, runtime)
    # The embedded default's "worker host" is the user's own machine: its folders are theirs.
    check_local_paths(normalised, settings.allow_local_find_links or not settings.database_url)
    manifest = check_manifest(inputs or [], settings)
    if any(item["path"] == script_name for item in manifest):
        # Both would be /work/<name>: the script sits beside its inputs, as it does locally.
        raise BadInput(f"an input has the script's own name {script_name}")
    for item in manifest:
        blob = find_blob(session, account_id, item["sha256"])
        if blob is None or blob.size != item["size"]:
            raise BadInput(f"input {item['path']} was not uploaded")
    if not all(isinstance(n, int) and n >= 0 for n in (files_uploaded, bytes_uploaded)):
        raise BadInput("files_uploaded and bytes_uploaded must be counts")
    if args is not None and not all(isinstance(a, str) for a in args):
        raise BadInput("args must be a list of strings")
    data = script.encode()
    digest = script_hash(data)
    key = cache_keys.script_object_key(account_id, digest)
    if not store.exists(key):
        store.put_bytes(key, data)
    execution = Execution(
        id=new_execution_id(),
        account_id=account_id,
        status="queued",
        runtime=runtime,
        script_name=script_name,
        script_hash=digest,
        args=list(args or []),
        requirements=normalised,
        refresh_deps=bool(refresh_deps),
        inputs=manifest,
        input_hash=cache_keys.input_hash(manifest) if manifest else None,
        input_cache_hit=bool(manifest) and files_uploaded == 0,
        files_uploaded=files_uploaded,
        timeout_s=timeout,
        script_cache_hit=False,
        dependency_cache_hit=None,
        bytes_uploaded=bytes_uploaded,
        outputs=[],
    )
    session.add(execution)
    session.flush()
    return execution


def get_execution(session: Session, account_id: int, execution_id: str) -> Execution:
    """Another account's execution is simply not found: no account learns of another's work."""
    execution = session.get(Execution, execution_id)
    if execution is None or execution.account_id != account_id:
        raise NotFound(f"no execution {execution_id}")
    return execution


def list_executions(session: Session, account_id: int, limit: int = 20) -> list[Execution]:
    return list(
        session.scalars(
            select(Execution)
            .where(Execution.account_id == account_id)
            .order_by(Execution.created_at.desc())
            .limit(max(1, min(limit, 500)))
        )
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def duration_s(execution: Execution) -> float | None:
    if execution.finished_at is None:
        return None
    created, finished = execution.created_at, execution.finished_at
    if (created.tzinfo is None) != (finished.tzinfo is None):  # SQLite drops the zone
        created, finished = created.replace(tzinfo=None), finished.replace(tzinfo=None)
    return round((finished - created).total_seconds(), 3)


def execution_to_dict(execution: Execution) -> dict:
    return {
        "execution_id": execution.id,
        "status": execution.status,
        "exit_code": execution.exit_code,
        "error": execution.error,
        "runtime": execution.runtime,
        "script_name": execution.script_name,
        "script_hash": execution.script_hash,
        "dependency_hash": execution.dependency_hash,
        "environment": execution.environment,
        "runtime_image": execution.runtime_image,
        "sandbox_warm": execution.sandbox_warm,
        "resolved_dependencies": execution.resolved_dependencies,
        "refresh_deps": execution.refresh_deps,
        "input_hash": execution.input_hash,
        "inputs": execution.inputs,
        "files_uploaded": execution.files_uploaded,
        "args": execution.args,
        "timeout_s": execution.timeout_s,
        "script_cache_hit": execution.script_cache_hit,
        "dependency_cache_hit": execution.dependency_cache_hit,
        "input_cache_hit": execution.input_cache_hit,
        "bytes_uploaded": execution.bytes_uploaded,
        "deps_build_s": execution.deps_build_s,
        "run_s": execution.run_s,
        "duration_s": duration_s(execution),
        "outputs": execution.outputs,
        "created_at": _iso(execution.created_at),
        "started_at": _iso(execution.started_at),
        "finished_at": _iso(execution.finished_at),
    }


def read_logs(execution: Execution, logs: LogBuffer, store: ObjectStore, offset: int = 0) -> dict:
    """Log chunks from ``offset`` on. ``complete`` is true once the final log is stored, so a
    follower knows it has seen everything."""
    complete = execution.status in TERMINAL_STATUSES
    chunks: list[LogChunk]
    if complete:
        try:
            chunks = decode_log(store.get_bytes(cache_keys.log_object_key(execution.id)))
        except NotFound:
            chunks = []
        chunks = chunks[offset:]
    else:
        chunks = logs.read(execution.id, offset)
    return {
        "status": execution.status,
        "complete": complete,
        "offset": offset,
        "next_offset": offset + len(chunks),
        "chunks": [list(chunk) for chunk in chunks],
    }


def output_listing(session: Session, execution: Execution, store: ObjectStore) -> list[dict]:
    """Each output with where to fetch it (a presigned URL, or the key for a local store)."""
    listing = []
    for output in execution.outputs or []:
        blob = find_blob(session, execution.account_id, output["sha256"])
        if blob is None:
            raise NotFound(f"output {output['path']} is no longer stored")
        listing.append(
            {**output, "key": blob.object_key, "url": store.download_url(blob.object_key)}
        )
    return listing
