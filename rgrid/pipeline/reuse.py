"""Instant repeats: a run whose every input is unchanged is answered from a previous succeeded
run of the same account, without a worker slot, a sandbox or the script (the output cache).

A sandbox has no network, so a run's result is a function of what RGrid already hashes: the
action key over the parts rgrid/pipeline/reuse_key.py lists. As Bazel's action cache and
Nextflow's ``-resume`` do, only a run that succeeded is kept; one that read forwarded stdin
never is (its input is not hashed), and one that failed, timed out, was cancelled or was cut
short by a limit did not succeed.

Here: the runtime image the grid runs (a key part, noted by the workers), the lookup at
submission and its answer, and the entry recorded when a run succeeds. A batch's page is
looked up at once in rgrid/pipeline/reuse_batch.py; `rgrid why` is rgrid/pipeline/reuse_why.py.
None of these imports the pipeline's steps: the API imports the output cache.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys, metrics
from rgrid.core.config import Settings
from rgrid.core.models import Execution, OutputCache, utcnow
from rgrid.core.statuses import Status
from rgrid.pipeline.reuse_key import env_digests, key_of, key_parts, known_resolution, resolution
from rgrid.store import blobs
from rgrid.store.objectstore import ObjectStore, exists_many

if TYPE_CHECKING:
    import redis

# --- the runtime image the run will get ------------------------------------------------------

_noted: dict[tuple[str, str], tuple[str, float]] = {}
#: A worker says again which image it runs at most this often (a Redis write otherwise).
NOTE_EVERY_S = 60.0


def note_runtime_image(client: redis.Redis, queue: str, runtime: str, image: str) -> None:
    """A worker ran ``runtime`` with ``image``: the API's action keys use it from now on."""
    seen = _noted.get((queue, runtime))
    if seen and seen[0] == image and time.monotonic() - seen[1] < NOTE_EVERY_S:
        return
    client.set(cache_keys.runtime_image_key(queue, runtime), image)
    _noted[(queue, runtime)] = (image, time.monotonic())


def grid_runtime_image(client: redis.Redis, queue: str, runtime: str) -> str | None:
    """The image the deployment's workers last ran ``runtime`` with (None: none yet)."""
    value = client.get(cache_keys.runtime_image_key(queue, runtime))
    return value.decode() if isinstance(value, bytes) else value


def local_runtime_image(runtime: str) -> str | None:
    """The embedded default's own engine's image for ``runtime``."""
    from rgrid.host.docker_engine import get_docker, image_id
    from rgrid.host.runtimes import resolve_runtime

    found = image_id(get_docker(), resolve_runtime(runtime).image)
    return found[:80] if found else None


# --- lookup at submission --------------------------------------------------------------------


def wanted(settings: Settings, reuse: bool | None) -> bool:
    return settings.reuse_default if reuse is None else bool(reuse)


def at_submission(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    execution: Execution,
    *,
    env: dict[str, str] | None,
    runtime_image: str | None,
    reuse: bool | None,
    refresh: bool = False,
) -> bool:
    """Store the action key's parts on a new execution and, with --reuse (or the default),
    answer it from the output cache. True: answered (succeeded, nothing to run)."""
    pins, environment = known_resolution(session, execution)
    parts = key_parts(
        settings,
        execution,
        runtime_image=runtime_image,
        resolution=resolution(execution, pins),
        env=env_digests(settings, env),
    )
    execution.action_parts = parts
    if not wanted(settings, reuse) or refresh or execution.stdin:
        return False
    execution.output_cache_hit = False
    key = key_of(settings, execution.account_id, parts)
    entry = lookup(session, execution.account_id, key) if key else None
    if entry is None or not still_stored(session, store, entry):
        if entry is not None:
            session.delete(entry)  # never a partial answer: the entry is dropped
        metrics.output_lookup(False)
        return False
    answer(session, execution, entry, key, environment, pins)
    metrics.output_lookup(True, entry.run_s, entry.bytes)
    return True


#: The lookup of an entry's id: built once, one column, on the session's connection past
#: the ORM's execution path (as the script cache's lookup: bench/cache_lookup.py measured a
#: whole ORM row per call at ~2x); only a hit loads its row.
_ENTRY_ID = select(OutputCache.id).where(
    OutputCache.account_id == bindparam("account_id"),
    OutputCache.action_key == bindparam("action_key"),
)


def lookup(session: Session, account_id: int, key: str) -> OutputCache | None:
    """One indexed read by (account, key): another account's identical run is a miss that
    costs what any miss costs."""
    found = (
        session.connection()
        .execute(_ENTRY_ID, {"account_id": account_id, "action_key": key})
        .first()
    )
    return session.get(OutputCache, found.id) if found is not None else None


def still_stored(session: Session, store: ObjectStore, entry: OutputCache) -> bool:
    """The original's log and every output blob are still in the store: one query for the
    blobs, one HEAD per object that holds them (a pack of 10,000 small outputs: one), the
    log's among them, all at once."""
    outputs = entry.outputs or []
    found = blobs.blobs_for(session, entry.account_id, [o["sha256"] for o in outputs])
    if any(output["sha256"] not in found for output in outputs):
        return False
    log = cache_keys.log_object_key(entry.execution_id)
    return all(exists_many(store, [log, *(blob.object_key for blob in found.values())]).values())


def answered_columns(
    entry: OutputCache, key: str, image: str | None, environment: str | None, pins, now
) -> dict:
    """What an execution answered from ``entry`` holds: the original's result and outputs (the
    same blobs), no run time, never dispatched to a worker. One list for a single run
    (``answer``) and a batch's page (``for_batch``)."""
    return {
        "status": Status.SUCCEEDED.value,
        "outcome": Status.SUCCEEDED.value,
        "exit_code": entry.exit_code,
        "outputs": list(entry.outputs or []),
        "reused_from": entry.execution_id,
        "output_cache_hit": True,
        "action_key": key,
        "runtime_image": image,
        "environment": environment,
        "resolved_dependencies": pins,
        "run_s": 0.0,
        "started_at": now,
        "finished_at": now,
        "dispatched_at": now,
    }


def answer(
    session: Session,
    execution: Execution,
    entry: OutputCache,
    key: str,
    environment: str | None,
    pins: list | None,
) -> None:
    """The execution ends as the original did, with its outputs (the same blobs) and its
    log (read from the original's stored log), touching the entry and the blobs."""
    now = utcnow()
    image = (execution.action_parts or {}).get("runtime_image")
    for column, value in answered_columns(entry, key, image, environment, pins, now).items():
        setattr(execution, column, value)
    entry.last_used_at = now
    entry.use_count = OutputCache.use_count + 1
    items = [*(entry.outputs or []), *(execution.inputs or [])]
    found = blobs.blobs_for(session, execution.account_id, [item["sha256"] for item in items])
    blobs.touch_all(session, [blob.id for blob in found.values()])


# --- recording a succeeded run ---------------------------------------------------------------


def clean_success(execution: Execution) -> bool:
    """Whether a succeeded run may answer later ones: its stored log is whole (no lost
    chunks, no output dropped at the log limit: ``log_incomplete``) and no limit cut it
    short (an exit 0 after the memory limit killed one of its processes is ``cut_short``).
    Replaying such a run would hand on less than the script gave."""
    return not execution.log_incomplete and not execution.cut_short


def record(session: Session, settings: Settings, execution: Execution) -> None:
    """At the final status: the key's parts from what the run actually got (for `rgrid why`),
    and for a succeeded run that read no stdin, its entry (replacing one of the same key:
    --refresh)."""
    if execution.reused_from is not None:
        return
    stored = execution.action_parts
    if stored is None and execution.env_names:
        return  # the values' digests were never taken: no key can be complete
    parts = key_parts(
        settings,
        execution,
        runtime_image=execution.runtime_image,
        resolution=resolution(execution, execution.resolved_dependencies),
        env=(stored or {}).get("env") or {},
    )
    key = key_of(settings, execution.account_id, parts)
    execution.action_parts, execution.action_key = parts, key
    if key is None or execution.stdin or execution.outcome != Status.SUCCEEDED:
        return
    if not clean_success(execution):
        return
    values = {
        "execution_id": execution.id,
        "outputs": list(execution.outputs or []),
        "exit_code": execution.exit_code or 0,
        "run_s": float(execution.run_s or 0.0),
        "bytes": sum(int(o.get("size") or 0) for o in execution.outputs or []),
        "last_used_at": utcnow(),
    }
    entry = lookup(session, execution.account_id, key)
    if entry is None:
        try:
            with session.begin_nested():
                session.add(
                    OutputCache(
                        account_id=execution.account_id, action_key=key, use_count=0, **values
                    )
                )
            return
        except IntegrityError:  # a concurrent identical run recorded it first
            entry = lookup(session, execution.account_id, key)
            if entry is None:
                return
    for name, value in values.items():
        setattr(entry, name, value)


def drop_entries(session: Session, account_id: int | None, older_than) -> int:
    """Entries unused since ``older_than`` (a datetime; of one account, or all)."""
    query = delete(OutputCache).where(OutputCache.last_used_at < older_than)
    if account_id is not None:
        query = query.where(OutputCache.account_id == account_id)
    return session.execute(query.execution_options(synchronize_session=False)).rowcount
