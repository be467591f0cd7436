"""Instant repeats: a run whose every input is unchanged is answered from a previous succeeded
run of the same account, without a worker slot, a sandbox or the script (the output cache).

A sandbox has no network, so a run's result is a function of what RGrid already hashes: the
action key (``cache_keys.action_key``) over the parts ``key_parts`` lists. As Bazel's action
cache and Nextflow's ``-resume`` do, only a run that succeeded is kept; one that read
forwarded stdin never is (its input is not hashed), and one that failed, timed out, was
cancelled or was cut short by a limit did not succeed.

The key is computed twice: at submission from what the run *will* get (the runtime image the
grid last ran, the resolution the dependency cache holds), to look it up; and when the run
succeeds, from what it *did* get, to record it. A new image or a re-resolved set therefore
misses instead of answering with a result of another environment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys, metrics
from rgrid.core.config import Settings
from rgrid.core.hashing import sha256_bytes
from rgrid.core.models import Blob, DependencyCache, Execution, OutputCache, utcnow
from rgrid.core.statuses import Status
from rgrid.store import blobs
from rgrid.store.objectstore import ObjectStore, exists_many

if TYPE_CHECKING:
    import redis

#: The parts of an action key that must all be known for a lookup or a record.
REQUIRED_PARTS = ("runtime_image", "resolution")


def _source_digest(execution: Execution) -> str:
    """The script's source tree: the entry script and its shipped modules, each at its path
    (``cache_keys.source_tree_digest``); a row from before source trees has only its
    script's hash."""
    return execution.source_digest or execution.script_hash


def _env_key(settings: Settings) -> bytes:
    """The server-side key the ``--env`` values are hashed with: derived from
    ``RGRID_SECRET_KEY`` (a key of its own, so a digest reveals nothing about the key that
    encrypts the values in Redis); without one (the embedded default), a random key kept in
    the data folder, readable by its user only."""
    if settings.secret_key:
        return hmac.new(
            settings.secret_key.encode(), b"rgrid action-cache env values v1", hashlib.sha256
        ).digest()
    path = Path(settings.data_dir) / "action-cache.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    try:
        os.link(partial, path)  # the first writer wins; a racing one reads its key
    except FileExistsError:
        partial.unlink()
        return bytes.fromhex(path.read_text().strip())
    partial.unlink()
    return key


def env_digests(settings: Settings, env: dict[str, str] | None) -> dict[str, str]:
    """Each ``--env`` name with an HMAC of its value: never the value, never a plain hash of
    it (a short secret's plain hash is one dictionary lookup away)."""
    if not env:
        return {}
    key = _env_key(settings)
    return {
        name: hmac.new(key, f"{name}={value}".encode(), hashlib.sha256).hexdigest()
        for name, value in sorted(env.items())
    }


def _dependency_hash(execution: Execution) -> str:
    from rgrid.host.requirements import dependency_hash, normalise

    return execution.dependency_hash or dependency_hash(normalise(execution.requirements or ""))


def resolution(execution: Execution, resolved: list[str] | None) -> str | None:
    """The installed environment's resolution hash ("" with no dependencies); None: not
    known (never resolved, or --refresh-deps resolves again)."""
    if not cache_keys.has_dependencies(_dependency_hash(execution)):
        return ""
    if resolved is None:
        return None
    from rgrid.host.dependencies import resolution_hash
    from rgrid.host.runtimes import resolve_runtime

    return resolution_hash(resolve_runtime(execution.runtime), execution.requirements, resolved)


def key_parts(
    settings: Settings,
    execution: Execution,
    *,
    runtime_image: str | None,
    resolution: str | None,
    env: dict[str, str],
) -> dict:
    """The action key's parts, as stored on the execution for `rgrid why`: digests and names
    only. ``runtime_image`` or ``resolution`` None: not known yet, so no key."""
    return {
        "runtime": execution.runtime,
        "runtime_image": runtime_image,
        "requirements": _dependency_hash(execution),
        "resolution": resolution,
        "source": _source_digest(execution),
        "inputs": execution.input_hash or "",
        "args": sha256_bytes(json.dumps(list(execution.args or [])).encode()),
        "env": env,
        "workdir": f"{cache_keys.WORKDIR_LAYOUT}:{execution.script_name}",
        "salt": sha256_bytes(settings.action_cache_salt.encode())[:16],
    }


def key_of(settings: Settings, account_id: int, parts: dict | None) -> str | None:
    if parts is None or any(parts.get(name) is None for name in REQUIRED_PARTS):
        return None
    return cache_keys.action_key(account_id, settings.action_cache_salt, parts)


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


def _known_resolution(session: Session, execution: Execution) -> tuple[list | None, str | None]:
    """(pins, environment folder) of the dependency cache's entry for the run, if any."""
    dep_hash = _dependency_hash(execution)
    if not cache_keys.has_dependencies(dep_hash) or execution.refresh_deps:
        return None, None
    row = session.execute(
        select(DependencyCache.resolved, DependencyCache.environment).where(
            DependencyCache.account_id == execution.account_id,
            DependencyCache.runtime == execution.runtime,
            DependencyCache.dependency_hash == dep_hash,
        )
    ).first()
    return (list(row.resolved), row.environment) if row else (None, None)


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
    pins, environment = _known_resolution(session, execution)
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
    blobs, one HEAD per object that holds them (a pack of 10,000 small outputs: one)."""
    if not store.exists(cache_keys.log_object_key(entry.execution_id)):
        return False
    outputs = entry.outputs or []
    found = blobs.blobs_for(session, entry.account_id, [o["sha256"] for o in outputs])
    if any(output["sha256"] not in found for output in outputs):
        return False
    return all(exists_many(store, [blob.object_key for blob in found.values()]).values())


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


# --- a batch's page of new executions, looked up at once -----------------------------------


def lookup_many(session: Session, account_id: int, keys: list[str]) -> dict[str, OutputCache]:
    """The account's entries of these keys, by key: one indexed query for a page (at most
    1,000 keys), not one per execution."""
    found: dict[str, OutputCache] = {}
    keys = list(dict.fromkeys(keys))
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        for entry in session.scalars(
            select(OutputCache).where(
                OutputCache.account_id == account_id, OutputCache.action_key.in_(chunk)
            )
        ):
            found[entry.action_key] = entry
    return found


def _stored_entries(
    session: Session, store: ObjectStore, account_id: int, entries: list[OutputCache]
) -> tuple[set[int], dict[str, Blob]]:
    """Which entries still have their log and every output blob in the store (what
    ``still_stored`` checks for one, here in one blob query and parallel HEADs), and the
    blobs found, by digest."""
    digests = [o["sha256"] for entry in entries for o in entry.outputs or []]
    found = blobs.blobs_for(session, account_id, digests)
    keys = [cache_keys.log_object_key(entry.execution_id) for entry in entries]
    keys += [blob.object_key for blob in found.values()]
    present = exists_many(store, keys)  # a LIST for a batch's logs, else HEADs
    good = set()
    for entry in entries:
        if not present.get(cache_keys.log_object_key(entry.execution_id)):
            continue
        if all(
            (blob := found.get(o["sha256"])) is not None and present.get(blob.object_key)
            for o in entry.outputs or []
        ):
            good.add(entry.id)
    return good, found


#: The columns a batch page's rows all carry, so that they go in as one multi-row INSERT
#: (a hit fills them in; a miss leaves them empty for its run).
ANSWER_COLUMNS = (
    "outcome",
    "exit_code",
    "reused_from",
    "output_cache_hit",
    "action_parts",
    "action_key",
    "runtime_image",
    "environment",
    "resolved_dependencies",
    "run_s",
    "started_at",
    "finished_at",
    "dispatched_at",
)


def for_batch(
    session: Session,
    store: ObjectStore | None,
    settings: Settings,
    account_id: int,
    rows: list[dict],
    *,
    reuse: bool | None,
    refresh: bool = False,
    runtime_image=None,
) -> list[str]:
    """A page of a batch's new executions (rows about to be inserted): each gets its action
    key's parts, and with --reuse (or the default) the page is looked up at once (one query
    for the entries, one for their blobs, parallel HEADs) and each hit is answered as a
    single run is (``answer``): succeeded, ``reused_from``, the original's outputs, never
    dispatched. Only the misses are left queued. ``runtime_image``: a callable giving the
    image the run will get for a runtime, called only when looking up. Returns the ids of
    the executions answered."""
    if not rows:
        return []
    now = utcnow()
    for row in rows:
        row.update(dict.fromkeys(ANSWER_COLUMNS))
        row["created_at"] = now
    looking = store is not None and wanted(settings, reuse) and not refresh
    image = runtime_image(rows[0]["runtime"]) if looking and runtime_image else None
    # One runtime, one requirements set per batch: one resolution for the page.
    first = SimpleNamespace(**rows[0], dependency_hash=None)
    pins, environment = _known_resolution(session, first)
    resolved = resolution(first, pins)
    keys: dict[str, dict] = {}
    for row in rows:
        probe = SimpleNamespace(**row, dependency_hash=None)
        parts = key_parts(settings, probe, runtime_image=image, resolution=resolved, env={})
        row["action_parts"] = parts
        if looking:
            row["output_cache_hit"] = False
            key = key_of(settings, account_id, parts)
            if key is not None:
                keys[key] = row
    if not looking:
        return []
    entries = lookup_many(session, account_id, list(keys))
    good, found = _stored_entries(session, store, account_id, list(entries.values()))
    gone = [entry.id for entry in entries.values() if entry.id not in good]
    if gone:  # never a partial answer: the entry is dropped, and the run is a miss
        session.execute(
            delete(OutputCache)
            .where(OutputCache.id.in_(gone))
            .execution_options(synchronize_session=False)
        )
    answered: list[str] = []
    touched: Counter[str] = Counter()
    for key, row in keys.items():
        entry = entries.get(key)
        if entry is None or entry.id not in good:
            continue
        row.update(answered_columns(entry, key, image, environment, pins, now))
        answered.append(row["id"])
        touched.update(o["sha256"] for o in [*(entry.outputs or []), *(row["inputs"] or [])])
        metrics.output_lookup(True, entry.run_s, entry.bytes)
    for _ in range(len(rows) - len(answered)):
        metrics.output_lookup(False)
    hit_ids = [entries[key].id for key in keys if key in entries and entries[key].id in good]
    if hit_ids:
        session.execute(
            update(OutputCache)
            .where(OutputCache.id.in_(hit_ids))
            .values(last_used_at=now, use_count=OutputCache.use_count + 1)
            .execution_options(synchronize_session=False)
        )
    _touch_blobs(session, account_id, touched, found, now)
    return answered


def _touch_blobs(
    session: Session, account_id: int, uses: Counter[str], known: dict[str, Blob], now
) -> None:
    """Each blob the answered executions use, touched once per use, in a statement per
    distinct count (a page's shared inputs are used by every one of its executions)."""
    if not uses:
        return
    missing = [digest for digest in uses if digest not in known]
    if missing:
        known = {**known, **blobs.blobs_for(session, account_id, missing)}
    by_count: dict[int, list[int]] = {}
    for digest, count in uses.items():
        if (blob := known.get(digest)) is not None:
            by_count.setdefault(count, []).append(blob.id)
    for count, ids in by_count.items():
        session.execute(
            update(Blob)
            .where(Blob.id.in_(ids))
            .values(last_used_at=now, use_count=Blob.use_count + count)
            .execution_options(synchronize_session=False)
        )


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


# --- why did it run again? -------------------------------------------------------------------


def nearest_earlier(session: Session, execution: Execution) -> Execution | None:
    """The account's latest run of the same script name before this one that has a key's
    parts (what Bazel's execution log and Nextflow's -dump-hashes compare against). A batch's
    execution is compared with the latest earlier one made for the same input path, if any
    (the batch's other inputs would all differ)."""
    query = (
        select(Execution)
        .where(
            Execution.account_id == execution.account_id,
            Execution.script_name == execution.script_name,
            Execution.created_at < execution.created_at,
            Execution.action_parts.is_not(None),
            Execution.id != execution.id,
        )
        .order_by(Execution.created_at.desc())
        .limit(1)
    )
    if execution.batch_item is not None:
        same_input = session.scalars(query.where(Execution.batch_item == execution.batch_item))
        if (found := same_input.first()) is not None:
            return found
    return session.scalars(query).first()


def _pin_names(pins: list[str] | None) -> dict[str, str]:
    import re

    found = {}
    for pin in pins or []:
        name = re.split(r"[=<>!~ ;@\[]", pin, maxsplit=1)[0].strip().lower()
        found[name] = pin
    return found


def differences(this: Execution, earlier: Execution) -> list[str]:
    """Which parts of the action key differ, in a user's words."""
    new, old = this.action_parts or {}, earlier.action_parts or {}
    said: list[str] = []
    if new.get("salt") != old.get("salt"):
        said.append("the operator's action-cache salt changed (every entry was disowned)")
    if new.get("runtime") != old.get("runtime"):
        said.append(f"runtime {new.get('runtime')} instead of {old.get('runtime')}")
    elif new.get("runtime_image") != old.get("runtime_image"):
        said.append(
            f"runtime image {(new.get('runtime_image') or 'unknown')[:19]} instead of"
            f" {(old.get('runtime_image') or 'unknown')[:19]}"
        )
    if new.get("source") != old.get("source"):
        said.append(f"the script {this.script_name} changed")
    if new.get("requirements") != old.get("requirements"):
        said.append("the requirements changed")
    elif new.get("resolution") != old.get("resolution"):
        now = _pin_names(this.resolved_dependencies)
        then = _pin_names(earlier.resolved_dependencies)
        changed = [
            f"{now[name]} instead of {then[name]}"
            for name in sorted(now.keys() & then.keys())
            if now[name] != then[name]
        ]
        changed += [f"{now[name]} added" for name in sorted(now.keys() - then.keys())]
        changed += [f"{then[name]} dropped" for name in sorted(then.keys() - now.keys())]
        if new.get("resolution") is None:
            said.append("the requirements were not resolved yet (or --refresh-deps)")
        elif changed:
            said.append("requirements resolved to " + ", ".join(changed))
        else:
            said.append("the requirements resolved differently")
    if new.get("inputs") != old.get("inputs"):
        now_in = {item["path"]: item["sha256"] for item in this.inputs or []}
        then_in = {item["path"]: item["sha256"] for item in earlier.inputs or []}
        for path in sorted(now_in.keys() | then_in.keys()):
            if path not in then_in:
                said.append(f"input {path} added")
            elif path not in now_in:
                said.append(f"input {path} removed")
            elif now_in[path] != then_in[path]:
                said.append(f"input {path} changed")
    if new.get("args") != old.get("args"):
        now_args, then_args = list(this.args or []), list(earlier.args or [])
        if len(now_args) != len(then_args):
            said.append(f"{len(now_args)} argument(s) instead of {len(then_args)}")
        said += [
            f"argument {number} differs"
            for number, (a, b) in enumerate(zip(now_args, then_args, strict=False), start=1)
            if a != b
        ]
    now_env, then_env = new.get("env") or {}, old.get("env") or {}
    for name in sorted(now_env.keys() | then_env.keys()):
        if name not in then_env:
            said.append(f"--env {name} added")
        elif name not in now_env:
            said.append(f"--env {name} removed")
        elif now_env[name] != then_env[name]:
            said.append(f"--env {name} has another value")
    if new.get("workdir") != old.get("workdir"):
        said.append("the working-directory layout differs")
    return said


def explain(session: Session, execution: Execution) -> dict:
    """`rgrid why`: whether the execution ran or was reused, and why, compared part by part
    with the nearest earlier run of its script name."""
    earlier = nearest_earlier(session, execution)
    reasons: list[str] = []
    if execution.reused_from:
        verdict = f"reused {execution.reused_from}: every part of its action key was unchanged"
    else:
        verdict = "ran"
        if execution.stdin:
            reasons.append("it read forwarded stdin: such a run is never reused")
        if execution.output_cache_hit is None and not execution.stdin:
            reasons.append("it was not asked to reuse (--reuse, or it ran with --refresh)")
    diffs = differences(execution, earlier) if earlier is not None else []
    if earlier is None:
        reasons.append(f"no earlier run of {execution.script_name} to compare with")
    elif not diffs and not execution.reused_from:
        if earlier.status != Status.SUCCEEDED:
            reasons.append(
                f"nothing differed, but {earlier.id} ended {earlier.status}: only succeeded"
                " runs are reused"
            )
        elif execution.output_cache_hit is False:
            reasons.append(f"nothing differed, but {earlier.id}'s result was no longer stored")
    return {
        "execution_id": execution.id,
        "script_name": execution.script_name,
        "verdict": verdict,
        "reused_from": execution.reused_from,
        "output_cache_hit": execution.output_cache_hit,
        "compared_with": earlier.id if earlier is not None else None,
        "compared_status": earlier.status if earlier is not None else None,
        "differences": diffs,
        "reasons": reasons,
        "action_key": execution.action_key,
    }
