"""The execution pipeline: hash -> cache-lookup -> build -> run -> store.

Each step takes an execution id, reads and writes that execution's row, and is safe to run
again (Celery may redeliver a task). The same functions run as separate Celery tasks on a worker
and one after another in process for the embedded default, so both give the same results.

A step that decides how the execution ends (a failed build, the script's exit) records it in
``outcome``; only the store step, once logs and outputs are safely stored, turns it into the
final ``status``. A client that sees a final status can therefore always read the whole log.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import docker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from rgrid import blobs, cache_keys, dependencies
from rgrid.builder import build_dependency_image, build_script_image
from rgrid.config import Settings
from rgrid.db import session_scope
from rgrid.docker_engine import get_docker, image_exists
from rgrid.errors import BuildError, RGridError
from rgrid.hashing import script_hash
from rgrid.locks import LockFactory
from rgrid.logbuffer import LogBuffer, encode_log
from rgrid.models import TERMINAL_STATUSES, DependencyCache, Execution, ScriptCache, utcnow
from rgrid.objectstore import ObjectStore
from rgrid.requirements import dependency_hash, normalise
from rgrid.runner import OutputLimitExceeded, Sandbox, run_script
from rgrid.runtimes import resolve_runtime

log = logging.getLogger(__name__)


@dataclass
class PipelineContext:
    """What the steps need from their surroundings; built once per worker process or CLI run."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    logs: LogBuffer
    locks: LockFactory
    docker_factory: Callable[[], docker.DockerClient] = get_docker

    @cached_property
    def docker(self) -> docker.DockerClient:
        return self.docker_factory()

    @property
    def sandbox(self) -> Sandbox:
        s = self.settings
        return Sandbox(
            user=s.container_user,
            memory=s.memory_limit,
            cpus=s.cpu_limit,
            pids=s.pids_limit,
            tmp_size=s.tmp_size,
            max_output_bytes=s.max_output_bytes,
        )

    def note(self, execution_id: str, text: str) -> None:
        """A line from RGrid itself in the execution's log (build output, cache decisions)."""
        self.logs.append(execution_id, "system", text if text.endswith("\n") else text + "\n")


def _load(session: Session, execution_id: str) -> Execution:
    execution = session.get(Execution, execution_id)
    if execution is None:
        raise RGridError(f"execution {execution_id} not found")
    return execution


def _finished(execution: Execution) -> bool:
    return execution.status in TERMINAL_STATUSES or execution.outcome is not None


def hash_step(ctx: PipelineContext, execution_id: str) -> None:
    """Recompute the hashes from the stored content: never trust the submitter's word."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution):
            return
        key = cache_keys.script_object_key(execution.account_id, execution.script_hash)
        actual = script_hash(ctx.store.get_bytes(key))
        if actual != execution.script_hash:
            execution.outcome = "error"
            execution.error = "stored script does not match its hash"
            return
        execution.dependency_hash = dependency_hash(normalise(execution.requirements or ""))


def _has_dependencies(execution: Execution) -> bool:
    return cache_keys.has_dependencies(execution.dependency_hash)


def _script_key(execution: Execution) -> str:
    assert execution.dependency_hash is not None
    return cache_keys.script_cache_key(
        execution.account_id, execution.runtime, execution.dependency_hash, execution.script_hash
    )


def _script_row(session: Session, execution: Execution) -> ScriptCache | None:
    return session.scalars(
        select(ScriptCache).where(
            ScriptCache.account_id == execution.account_id,
            ScriptCache.runtime == execution.runtime,
            ScriptCache.dependency_hash == execution.dependency_hash,
            ScriptCache.script_hash == execution.script_hash,
        )
    ).one_or_none()


def _dependency_row(session: Session, execution: Execution) -> DependencyCache | None:
    return session.scalars(
        select(DependencyCache).where(
            DependencyCache.account_id == execution.account_id,
            DependencyCache.runtime == execution.runtime,
            DependencyCache.dependency_hash == execution.dependency_hash,
        )
    ).one_or_none()


def _base_image(execution: Execution) -> str:
    return execution.dependency_image or resolve_runtime(execution.runtime).image


def _find_script_image(ctx: PipelineContext, session: Session, execution: Execution) -> str | None:
    """The cached script image for this execution, if its row exists, it was built on the
    base this execution uses, and the image is still there. Anything else is a miss: a row
    whose image vanished (pruned, new host) is rebuilt, not an error."""
    row = _script_row(session, execution)
    if row is None or (row.base_image or resolve_runtime(row.runtime).image) != _base_image(
        execution
    ):
        return None
    return row.image_ref if image_exists(ctx.docker, row.image_ref) else None


def _find_dependency_image(
    ctx: PipelineContext, session: Session, execution: Execution
) -> DependencyCache | None:
    row = _dependency_row(session, execution)
    if row is None or not image_exists(ctx.docker, row.image_ref):
        return None
    return row


def _use_dependencies(execution: Execution, row: DependencyCache) -> None:
    execution.dependency_image = row.image_ref
    execution.resolved_dependencies = list(row.resolved)


def cache_lookup_step(ctx: PipelineContext, execution_id: str) -> None:
    """Dependency cache, then script cache. With --refresh-deps the dependency set is resolved
    again in the build step first, so the script cache is consulted there."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution):
            return
        if _has_dependencies(execution):
            if execution.refresh_deps:
                ctx.note(execution_id, "dependency cache skipped: --refresh-deps")
                return
            row = _find_dependency_image(ctx, session, execution)
            execution.dependency_cache_hit = row is not None
            ctx.note(execution_id, f"dependency cache {'hit' if row else 'miss'}")
            if row is None:
                return
            _use_dependencies(execution, row)
        image = _find_script_image(ctx, session, execution)
        execution.script_cache_hit = image is not None
        execution.image_ref = image
        ctx.note(execution_id, f"script cache {'hit' if image else 'miss'}")


def _fail_build(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """A failed build ends the execution; no cache row is written, so fixing and rerunning works."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        execution.outcome = "build_failed"
        execution.error = message
    ctx.note(execution_id, message)


def _ensure_dependency_image(ctx: PipelineContext, execution_id: str) -> bool:
    """Resolve, install and build the dependency image, once per key across the grid.
    Returns False when the build failed (the execution is then over)."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
    spec = resolve_runtime(execution.runtime)
    key = cache_keys.dependency_cache_key(
        execution.account_id, execution.runtime, execution.dependency_hash or ""
    )
    log = lambda line: ctx.logs.append(execution_id, "system", line)  # noqa: E731
    with ctx.locks.hold(cache_keys.build_lock_name(key), ctx.settings.build_lock_timeout_s):
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            row = _find_dependency_image(ctx, session, execution)
            if row is not None and not execution.refresh_deps:
                # Another builder finished this set while we waited for the lock.
                _use_dependencies(execution, row)
                execution.dependency_cache_hit = True
                ctx.note(execution_id, "dependency image built by a concurrent run: cache hit")
                return True
        requirements = execution.requirements
        cache_dir = ctx.settings.uv_cache_dir
        started = time.monotonic()
        try:
            ctx.note(execution_id, "resolving dependencies")
            pinned = dependencies.resolve(
                requirements, spec, cache_dir, log, refresh=execution.refresh_deps
            )
            tag = cache_keys.dependency_image_ref(
                execution.account_id, dependencies.resolution_hash(spec, requirements, pinned)
            )
            deps_build_s = None
            if image_exists(ctx.docker, tag):
                ctx.note(execution_id, f"resolved set already installed in {tag}: no install")
            else:
                with tempfile.TemporaryDirectory(prefix="rgrid-deps-") as target:
                    ctx.note(execution_id, f"installing {len(pinned)} packages")
                    dependencies.install(requirements, pinned, spec, Path(target), cache_dir, log)
                    ctx.note(execution_id, f"building dependency image {tag}")
                    build_dependency_image(
                        ctx.docker, spec.image, Path(target), spec.site_packages, tag, log
                    )
                deps_build_s = round(time.monotonic() - started, 3)
        except BuildError as exc:
            _fail_build(ctx, execution_id, exc.message)
            return False
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            row = _dependency_row(session, execution)
            if row is None:
                row = DependencyCache(
                    account_id=execution.account_id,
                    runtime=execution.runtime,
                    dependency_hash=execution.dependency_hash,
                    use_count=0,
                )
                session.add(row)
            row.image_ref, row.resolved = tag, pinned
            execution.dependency_image, execution.resolved_dependencies = tag, pinned
            execution.deps_build_s = deps_build_s
    return True


def _record_image(session: Session, execution: Execution, image_ref: str) -> None:
    row = _script_row(session, execution)
    if row is None:
        row = ScriptCache(
            account_id=execution.account_id,
            runtime=execution.runtime,
            dependency_hash=execution.dependency_hash,
            script_hash=execution.script_hash,
            use_count=0,
        )
        session.add(row)
    row.image_ref = image_ref
    row.base_image = _base_image(execution)


def build_step(ctx: PipelineContext, execution_id: str) -> None:
    """Build what the caches lacked: the dependency image, then the script layer on it."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution) or execution.script_cache_hit:
            return
        execution.status = "building"
        needs_dependencies = _has_dependencies(execution) and execution.dependency_image is None
    spec = resolve_runtime(execution.runtime)
    if not image_exists(ctx.docker, spec.image):
        # The classic builder would try to pull the FROM image, and there is no registry.
        _fail_build(
            ctx,
            execution_id,
            f"runtime image {spec.image} is not built on this Docker host: "
            f"run `rgrid runtime build {spec.name}`",
        )
        return
    if needs_dependencies and not _ensure_dependency_image(ctx, execution_id):
        return
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
    key = _script_key(execution)
    with ctx.locks.hold(cache_keys.build_lock_name(key), ctx.settings.build_lock_timeout_s):
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            image = _find_script_image(ctx, session, execution)
            if image is not None:
                # Built by a concurrent run while we waited, or still valid after a refresh
                # that resolved to the same set.
                execution.script_cache_hit = True
                execution.image_ref = image
                execution.status = "queued"
                ctx.note(execution_id, "script cache hit")
                return
        script = ctx.store.get_bytes(
            cache_keys.script_object_key(execution.account_id, execution.script_hash)
        )
        tag = cache_keys.script_image_ref(key)
        base = _base_image(execution)
        ctx.note(execution_id, f"building script image {tag} on {base}")
        try:
            build_s = build_script_image(
                ctx.docker,
                base,
                script,
                tag,
                log=lambda line: ctx.logs.append(execution_id, "system", line),
            )
        except BuildError as exc:
            _fail_build(ctx, execution_id, exc.message)
            return
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            _record_image(session, execution, tag)
            execution.image_ref = tag
            execution.build_s = round(build_s, 3)
            execution.status = "queued"


def _local_inputs(ctx: PipelineContext, execution: Execution) -> list[tuple[str, Path]]:
    """Each input as (name in /work, verified local copy from this host's blob cache)."""
    keys = {}
    with session_scope(ctx.session_factory) as session:
        for item in execution.inputs or []:
            blob = blobs.find_blob(session, execution.account_id, item["sha256"])
            if blob is None:
                raise RGridError(
                    f"input {item['path']} is no longer stored; run again to upload it"
                )
            keys[item["sha256"]] = blob.object_key
    return [
        (
            item["path"],
            blobs.cached_copy(
                ctx.store,
                keys[item["sha256"]],
                item["sha256"],
                ctx.settings.blob_cache_dir / str(execution.account_id),
            ),
        )
        for item in execution.inputs or []
    ]


def _store_outputs(ctx: PipelineContext, execution: Execution, spool: Path, outputs: list) -> None:
    """Outputs are blobs of the account too: a file some run already produced is not stored
    twice."""
    for output in outputs:
        with session_scope(ctx.session_factory) as session:
            blobs.store_file(
                session, ctx.store, execution.account_id, spool / output["path"], output["sha256"]
            )


def _capped_log(ctx: PipelineContext, execution_id: str):
    """The log sink for a running script: the buffer lives in Redis, which is also the broker,
    so a script printing in a loop must not be able to fill it. Past the cap, output is
    dropped with one note saying so."""
    limit = ctx.settings.max_log_bytes
    written = 0

    def sink(stream: str, text: str) -> None:
        nonlocal written
        if written >= limit:
            return
        size = len(text.encode())
        if written + size > limit:
            text = text.encode()[: limit - written].decode(errors="ignore")
            ctx.logs.append(execution_id, stream, text)
            ctx.note(execution_id, f"\nlog truncated: the script printed more than {limit} bytes")
            written = limit
            return
        written += size
        ctx.logs.append(execution_id, stream, text)

    return sink


def run_step(ctx: PipelineContext, execution_id: str) -> None:
    """Place the inputs, run the container, stream its output, store what it wrote."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution):
            return
        image = execution.image_ref
    if not image or not image_exists(ctx.docker, image):
        # Pruned since the lookup (or built on another host): a miss, not an error.
        ctx.note(execution_id, f"image {image} is gone from this Docker host: building again")
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            execution.script_cache_hit = False
            execution.image_ref = None
            if execution.dependency_image and not image_exists(
                ctx.docker, execution.dependency_image
            ):
                execution.dependency_image = None
                execution.dependency_cache_hit = False
        build_step(ctx, execution_id)
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution):
            return
        execution.status = "running"
        execution.started_at = utcnow()
    inputs = _local_inputs(ctx, execution)
    if inputs:
        ctx.note(execution_id, f"placing {len(inputs)} input file(s) in /work")
    spool = Path(tempfile.mkdtemp(prefix=f"rgrid-out-{execution_id}-"))
    try:
        try:
            result = run_script(
                ctx.docker,
                execution_id=execution_id,
                image=execution.image_ref or "",
                args=list(execution.args or []),
                timeout_s=execution.timeout_s,
                sandbox=ctx.sandbox,
                outputs_dest=spool,
                on_output=_capped_log(ctx, execution_id),
                inputs=inputs,
            )
        except OutputLimitExceeded as exc:
            with session_scope(ctx.session_factory) as session:
                execution = _load(session, execution_id)
                execution.outcome = "failed"
                execution.error = str(exc)
            ctx.note(execution_id, str(exc))
            return
        for note in result.notes:
            ctx.note(execution_id, note)
        _store_outputs(ctx, execution, spool, result.outputs)
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            execution.exit_code = result.exit_code
            execution.run_s = round(result.run_s, 3)
            execution.outputs = result.outputs
            if result.timed_out:
                execution.outcome = "timed_out"
                execution.error = f"timed out after {execution.timeout_s}s"
                ctx.note(execution_id, execution.error)
            else:
                execution.outcome = "succeeded" if result.exit_code == 0 else "failed"
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _persist_logs(ctx: PipelineContext, execution_id: str) -> None:
    chunks = ctx.logs.read(execution_id)
    ctx.store.put_bytes(cache_keys.log_object_key(execution_id), encode_log(chunks))


def store_step(ctx: PipelineContext, execution_id: str) -> None:
    """Store the log, touch the cache row, and only then publish the final status."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if execution.status in TERMINAL_STATUSES:
            return
        if execution.image_ref and execution.outcome in ("succeeded", "failed", "timed_out"):
            rows = [_script_row(session, execution)]
            if _has_dependencies(execution):
                rows.append(_dependency_row(session, execution))
            for row in rows:
                if row is not None:
                    row.last_used_at = utcnow()
                    row.use_count += 1
            for item in execution.inputs or []:
                blob = blobs.find_blob(session, execution.account_id, item["sha256"])
                if blob is not None:
                    blobs.touch(blob)
    _persist_logs(ctx, execution_id)
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        execution.status = execution.outcome or "error"
        execution.finished_at = utcnow()
    ctx.logs.clear(execution_id)


def fail(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """Called when a step raised: the execution ends in ``error`` with its log kept."""
    log.error("execution %s failed: %s", execution_id, message)
    try:
        ctx.note(execution_id, f"error: {message}")
        _persist_logs(ctx, execution_id)
    except Exception:  # noqa: BLE001 - the row must still be marked even if the store is down
        log.exception("could not store the log of %s", execution_id)
    with session_scope(ctx.session_factory) as session:
        execution = session.get(Execution, execution_id)
        if execution is None or execution.status in TERMINAL_STATUSES:
            return
        execution.status = "error"
        execution.outcome = "error"
        execution.error = message
        execution.finished_at = utcnow()
    ctx.logs.clear(execution_id)


STEPS = (hash_step, cache_lookup_step, build_step, run_step, store_step)


def run_all(ctx: PipelineContext, execution_id: str) -> None:
    """Every step in order, in this process: the embedded default."""
    try:
        for step in STEPS:
            step(ctx, execution_id)
    except RGridError as exc:
        fail(ctx, execution_id, exc.message)
    except Exception as exc:  # noqa: BLE001 - any bug still ends the execution cleanly
        log.exception("pipeline crashed")
        fail(ctx, execution_id, f"{type(exc).__name__}: {exc}")
