"""The execution pipeline: hash -> cache-lookup -> build -> run -> store.

Each step takes an execution id, reads and writes that execution's row, and is safe to run
again (Celery may redeliver a task). The same functions run as separate Celery tasks on a worker
and one after another in process for the embedded default, so both give the same results.

A step that decides how the execution ends (a failed build, the script's exit) records it in
``outcome``; only the store step, once logs and outputs are safely stored, turns it into the
final ``status``. A client that sees a final status can therefore always read the whole log.

Nothing is built for a script: it reaches its sandbox as a file. The build step only installs
a dependency set this host lacks (``rgrid/host/environments.py``), and the run step claims a
pre-started sandbox for the environment (``rgrid/host/pool.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import docker
from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, object_session, sessionmaker

from rgrid.core import cache_keys, metrics
from rgrid.core.config import Settings
from rgrid.core.db import session_scope
from rgrid.core.errors import (
    BadInput,
    BuildError,
    NotFound,
    RGridError,
    ServiceUnavailable,
    user_message,
)
from rgrid.core.hashing import script_hash
from rgrid.core.locks import LockFactory
from rgrid.core.models import DependencyCache, Execution, ScriptCache, utcnow
from rgrid.core.statuses import TERMINAL_STATUSES, Status, check_transition
from rgrid.core.units import human_limit, parse_bytes
from rgrid.host import (
    dependencies,
    disk,
    environments,
    envlocks,
    indexes,
    pool,
    sandbox,
    sandbox_container,
    sandbox_files,
    sandbox_reattach,
    sandbox_run,
    slots,
)
from rgrid.host.docker_engine import get_docker, image_id
from rgrid.host.hosts import HostRegistry
from rgrid.host.requirements import dependency_hash, normalise
from rgrid.host.runtimes import resolve_runtime
from rgrid.pipeline import reuse
from rgrid.store import blobs
from rgrid.store.channels import ScriptChannels
from rgrid.store.logbuffer import LogBuffer, log_stream, stored_size
from rgrid.store.objectstore import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class PipelineContext:
    """What the steps need from their surroundings; built once per worker process or CLI run."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    logs: LogBuffer
    locks: LockFactory
    #: Environment variables and stdin on their way to the script.
    channels: ScriptChannels
    docker_factory: Callable[[], docker.DockerClient] = get_docker
    #: Warm sandboxes kept per environment; None: the operator's setting. The embedded
    #: default keeps one, for the environment it last used.
    pool_size: int | None = None
    #: Work started off the user's path (refilling the pool). A process that is about to
    #: exit joins these first.
    background: list[threading.Thread] = field(default_factory=list)
    #: True for the embedded default: the pipeline runs in the CLI's own process.
    embedded: bool = False
    #: Which hosts hold which environment (server side); None: one host, nothing to share.
    hosts: HostRegistry | None = None

    @cached_property
    def docker(self) -> docker.DockerClient:
        return self.docker_factory()

    @property
    def limits(self) -> sandbox.Limits:
        return sandbox.Limits.from_settings(self.settings)

    @property
    def pool(self) -> pool.PoolSettings:
        s = self.settings
        return pool.PoolSettings(
            root=s.sandboxes_dir,
            size=s.pool_size if self.pool_size is None else self.pool_size,
            max_total=s.pool_max,
            idle_s=s.pool_idle_s,
        )

    def note(self, execution_id: str, text: str) -> None:
        """A line from RGrid itself in the execution's log (cache decisions, limits hit)."""
        self.logs.append(execution_id, "system", text if text.endswith("\n") else text + "\n")

    def phase(self, execution_id: str, text: str) -> None:
        """The start of a phase a user waits through (resolving, installing, starting): the
        CLI shows one line per phase with its elapsed time."""
        self.logs.append(execution_id, "phase", text)

    def detail(self, execution_id: str) -> Callable[[str], None]:
        """A sink for an installer's raw output: kept in the log, shown with ``-v``. Bounded
        like the script's own output (an index chooses what the installer prints)."""
        room = self.settings.max_log_bytes

        def sink(line: str) -> None:
            nonlocal room
            line = line[:MAX_CHUNK_CHARS]
            room -= stored_size("detail", line)
            if room >= 0:
                self.logs.append(execution_id, "detail", line)

        return sink

    @property
    def worker_id(self) -> str:
        """Who runs a script: this host and process (the pid changes in each Celery child)."""
        prefix = "embedded:" if self.embedded else ""
        return f"{prefix}{socket.gethostname()}:{os.getpid()}"

    def warm(self, environment: str | None) -> None:
        """Tell the grid this host has ``environment``, so later runs of it come here."""
        if self.hosts is not None and environment:
            with contextlib.suppress(Exception):  # only a preference: never fail a run for it
                self.hosts.has_environment(self.settings.host_name, environment)

    def join_background(self, timeout_s: float = 30) -> None:
        for thread in self.background:
            thread.join(timeout_s)
        self.background.clear()


def _load(session: Session, execution_id: str) -> Execution:
    execution = session.get(Execution, execution_id)
    if execution is None:
        raise RGridError(f"execution {execution_id} not found")
    return execution


@contextmanager
def execution_row(ctx: PipelineContext, execution_id: str) -> Iterator[Execution]:
    """Load, change and commit one execution's row: the one way the steps touch it."""
    with session_scope(ctx.session_factory) as session:
        yield _load(session, execution_id)


#: How long a step waits for a service to come back before giving up on a result it holds.
PATIENCE_S = 120.0


def patiently(fn: Callable[[], T]) -> T:
    """Call ``fn`` until a momentary outage (database, Redis, object store: all raise
    ServiceUnavailable) has passed, for up to ``PATIENCE_S``. For what comes after a script
    ran: its result must not be lost to a restart, and running the script again to recover
    it is no answer."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    retrying = Retrying(
        retry=retry_if_exception_type(ServiceUnavailable),
        stop=stop_after_delay(PATIENCE_S),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=lambda state: log.warning(
            "waiting for a service: %s", state.outcome.exception() if state.outcome else ""
        ),
        reraise=True,
    )
    return retrying(fn)


def update_execution(
    ctx: PipelineContext, execution_id: str, change: Callable[[Execution], None]
) -> Execution:
    """Change the row and commit, patiently (see ``patiently``); returns the row committed."""

    def attempt() -> Execution:
        with execution_row(ctx, execution_id) as execution:
            change(execution)
        return execution

    return patiently(attempt)


def set_status(execution: Execution, status: Status) -> None:
    execution.status = check_transition(execution.status, status)


def _finished(execution: Execution) -> bool:
    return execution.status in TERMINAL_STATUSES or execution.outcome is not None


def _has_dependencies(execution: Execution) -> bool:
    return cache_keys.has_dependencies(execution.dependency_hash)


def _script_bytes(ctx: PipelineContext, execution: Execution) -> bytes:
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
        if _finished(execution):
            return
        try:
            _script_bytes(ctx, execution)
        except RGridError as exc:
            execution.outcome = Status.ERROR
            execution.error = exc.message
            return
        execution.dependency_hash = dependency_hash(normalise(execution.requirements or ""))
        if execution.dependency_source and _has_dependencies(execution):
            ctx.note(execution_id, f"dependencies from {execution.dependency_source}")


def _tree_key(execution: Execution) -> str:
    """The script part of the script cache's key: the source-tree digest (a row written
    before source trees existed has only its script hash)."""
    return execution.source_digest or execution.script_hash


def _script_row(session: Session, execution: Execution) -> ScriptCache | None:
    return session.scalars(
        select(ScriptCache).where(
            ScriptCache.account_id == execution.account_id,
            ScriptCache.runtime == execution.runtime,
            ScriptCache.dependency_hash == execution.dependency_hash,
            ScriptCache.script_hash == _tree_key(execution),
        )
    ).one_or_none()


#: The script-cache lookup of the cache-lookup step: built once, only the column it needs
#: (bench/cache_lookup.py: a whole ORM row built per call cost ~2x at a million rows).
_SCRIPT_ENVIRONMENT = select(ScriptCache.environment).where(
    ScriptCache.account_id == bindparam("account_id"),
    ScriptCache.runtime == bindparam("runtime"),
    ScriptCache.dependency_hash == bindparam("dependency_hash"),
    ScriptCache.script_hash == bindparam("script_hash"),
)


def script_cache_environment(session: Session, execution: Execution) -> Row | None:
    """The script-cache entry's environment (a row with ``.environment``), or None: a miss."""
    key = {
        "account_id": execution.account_id,
        "runtime": execution.runtime,
        "dependency_hash": execution.dependency_hash,
        "script_hash": _tree_key(execution),
    }
    # On the session's connection, in its transaction, past the ORM's execution path (a
    # plain column needs none of it): p50 0.11 ms against 0.20 ms through session.execute.
    return session.connection().execute(_SCRIPT_ENVIRONMENT, key).first()


def _dependency_row(session: Session, execution: Execution) -> DependencyCache | None:
    return session.scalars(
        select(DependencyCache).where(
            DependencyCache.account_id == execution.account_id,
            DependencyCache.runtime == execution.runtime,
            DependencyCache.dependency_hash == execution.dependency_hash,
        )
    ).one_or_none()


@contextmanager
def cache_tables(ctx: PipelineContext, execution_id: str, session: Session) -> Iterator[None]:
    """Cache-table work in a savepoint. If the cache tables cannot be read or written (a
    damaged or locked table), the execution goes on without the cache, as a miss, and says
    so; losing the whole database is not this (it raises, and the step is retried)."""
    try:
        with session.begin_nested():
            yield
    except DBAPIError as exc:
        _cache_unavailable(ctx, execution_id, exc)


@contextmanager
def cache_reads(ctx: PipelineContext, execution_id: str, session: Session) -> Iterator[None]:
    """``cache_tables`` for lookups made before the step has changed anything: no savepoint
    (two round trips fewer on every lookup; bench/cache_lookup.py), and a failure rolls back
    a transaction that held nothing yet (the execution row is read again on next use)."""
    try:
        yield
    except DBAPIError as exc:
        session.rollback()
        _cache_unavailable(ctx, execution_id, exc)


def _cache_unavailable(ctx: PipelineContext, execution_id: str, exc: DBAPIError) -> None:
    if exc.connection_invalidated:
        raise exc
    reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
    log.warning("%s: cache unavailable, going on as a miss: %s", execution_id, reason)
    ctx.note(execution_id, f"cache unavailable ({reason}): going on without it")


def _environment_present(ctx: PipelineContext, name: str | None) -> bool:
    return environments.present(ctx.settings.environments_dir, name)


def _environment_on_a_host(ctx: PipelineContext, name: str | None) -> bool:
    """Here, or on a live host the Docker steps will be sent to (the lookup itself runs on
    whichever host took it)."""
    if _environment_present(ctx, name):
        return True
    if ctx.hosts is None or name is None:
        return False
    me = ctx.settings.host_name
    try:
        ctx.hosts.lost_environment(me, name)  # this host knows from its own disk
        return ctx.hosts.host_with_environment(name, exclude=me) is not None
    except Exception:  # noqa: BLE001 - Redis away: a miss, the build step will see
        return False


def cache_lookup_step(ctx: PipelineContext, execution_id: str) -> None:
    """Script cache, then dependency cache. A row whose environment neither this host nor a
    live host has is a miss (the build step installs its pins again, without resolving).
    With --refresh-deps the set is resolved again in the build step, so both are skipped."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if _finished(execution):
            return
        deps = _has_dependencies(execution)
        if deps and execution.refresh_deps:
            ctx.note(execution_id, "dependency cache skipped: --refresh-deps")
            execution.dependency_cache_hit = False
            return
        dep_row = script_row = None
        with cache_reads(ctx, execution_id, session):
            dep_row = _dependency_row(session, execution) if deps else None
            script_row = script_cache_environment(session, execution)
        if dep_row is not None:
            execution.resolved_dependencies = list(dep_row.resolved)
            execution.environment = dep_row.environment
        dep_hit = dep_row is not None and _environment_on_a_host(ctx, dep_row.environment)
        execution.dependency_cache_hit = dep_hit if deps else None
        execution.script_cache_hit = (
            script_row is not None
            and (not deps or dep_hit)
            and script_row.environment == execution.environment
        )
        ctx.note(
            execution_id,
            f"script cache {'hit' if execution.script_cache_hit else 'miss'}"
            + (f" · dependency cache {'hit' if dep_hit else 'miss'}" if deps else ""),
        )
        if dep_row is not None and not dep_hit:
            ctx.note(execution_id, "the installed set is not on this host: installing its pins")


def _take_slot(ctx: PipelineContext, execution: Execution, to: Status) -> None:
    """Move to ``to`` (``building``: a build slot; ``running``: a run slot) only within the
    account's fair share of that kind's slots on the live hosts (raises
    ``slots.AccountBusy``, before anything is done, otherwise)."""
    if ctx.embedded:
        return  # one user's own machine: nobody else's work to wait for
    session = object_session(execution)
    assert session is not None
    settings = ctx.settings
    per_host = settings.build_concurrency if to == Status.BUILDING else settings.worker_concurrency
    hosts_live = len(ctx.hosts.live_hosts()) if ctx.hosts is not None else 0
    slots.take_slot(
        session, execution, to, per_host * max(1, hosts_live), settings.max_concurrent_per_account
    )


def _fail_build(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """A failed build ends the execution; no cache row is written, so fixing and rerunning works."""
    with execution_row(ctx, execution_id) as execution:
        execution.outcome = Status.BUILD_FAILED
        execution.error = message
    ctx.note(execution_id, message)


def _ensure_environment(ctx: PipelineContext, execution_id: str) -> bool:
    """Install the execution's dependency set on this host unless it is there, once per key
    across the grid. Returns False when the install failed (the execution is then over)."""
    with metrics.ENVIRONMENT_BUILD.time():
        return _provide_environment(ctx, execution_id)


def _provide_environment(ctx: PipelineContext, execution_id: str) -> bool:
    with execution_row(ctx, execution_id) as execution:
        spec = resolve_runtime(execution.runtime)
        key = cache_keys.dependency_cache_key(
            execution.account_id, execution.runtime, execution.dependency_hash or ""
        )
    # A set resolved before (its pins are in the dependency cache) only needs installing on
    # this host: a lock per host, so hosts install it side by side. A set never resolved
    # takes the grid-wide lock, so it is resolved once.
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        known = None
        with cache_tables(ctx, execution_id, session):
            known = _dependency_row(session, execution)
        lock = cache_keys.build_lock_name(key)
        if known is not None and not execution.refresh_deps:
            lock = cache_keys.host_build_lock_name(key, ctx.settings.host_name)
    with ExitStack() as held:
        held.enter_context(ctx.locks.hold(lock, ctx.settings.build_lock_timeout_s))
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            row = None
            with cache_tables(ctx, execution_id, session):
                row = _dependency_row(session, execution)
            if (
                row is not None
                and not execution.refresh_deps
                and _environment_present(ctx, row.environment)
            ):
                # Another builder finished this set while we waited for the lock.
                execution.environment = row.environment
                execution.resolved_dependencies = list(row.resolved)
                ctx.note(execution_id, "installed by a concurrent run: dependency cache hit")
                ctx.warm(row.environment)
                return True
            resolved_meanwhile = known is None and row is not None and not execution.refresh_deps
            pinned = list(row.resolved) if row is not None and not execution.refresh_deps else None
            requirements, account_id = execution.requirements, execution.account_id
            refresh = execution.refresh_deps
        if resolved_meanwhile:
            # Another host resolved the set while we waited for the grid-wide lock: install
            # its pins under this host's lock instead, which this host's other builders of
            # the set take (with a build pool per host, several wait at once).
            held.close()
            return _provide_environment(ctx, execution_id)
        if not ctx.embedded:
            try:  # checked at submission too; the operator's list may have changed since
                dependencies.check_sources(ctx.settings, requirements)
            except BadInput as exc:
                _fail_build(ctx, execution_id, exc.message)
                return False
        count = sum(1 for line in requirements.splitlines() if not line.startswith("-"))
        if pinned is None and dependencies.is_locked(requirements):
            ctx.phase(execution_id, f"installing {count} locked package(s), nothing to resolve")
        elif pinned is None:
            ctx.phase(execution_id, f"resolving and installing {count} requirement(s)")
        else:
            ctx.phase(execution_id, f"installing {len(pinned)} package(s)")
        try:
            installed = environments.install(
                ctx.settings.environments_dir,
                account_id=account_id,
                spec=spec,
                requirements=requirements,
                uv_cache_dir=dependencies.uv_cache_for(
                    ctx.settings, account_id, requirements, embedded=ctx.embedded
                ),
                log=ctx.detail(execution_id)
                if ctx.embedded
                else indexes.without_downloads(ctx.detail(execution_id)),
                pinned=pinned,
                refresh=refresh,
                deadline_s=ctx.settings.build_timeout_s,
            )
        except BuildError as exc:
            _fail_build(ctx, execution_id, exc.message)
            return False
        metrics.ENVIRONMENT_INSTALL.observe(installed.install_s)
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
            with cache_tables(ctx, execution_id, session):
                row = _dependency_row(session, execution)
                if row is None:
                    row = DependencyCache(
                        account_id=execution.account_id,
                        runtime=execution.runtime,
                        dependency_hash=execution.dependency_hash,
                        use_count=0,
                    )
                    session.add(row)
                row.environment, row.resolved = installed.name, installed.pinned
                session.flush()
            execution.environment = installed.name
            execution.resolved_dependencies = installed.pinned
            execution.deps_build_s = installed.install_s
    summary = f"installed {len(installed.pinned)} package(s) in {installed.install_s:.2f}s"
    ctx.note(execution_id, summary if installed.name else "the requirements install nothing")
    if installed.name:
        ctx.warm(installed.name)
        deps_dir = ctx.settings.environments_dir / installed.name
        # Sandboxes warmed for an earlier folder of this name still mount the removed one.
        env = sandbox.Environment(spec.image, deps_dir)
        pool.retire_all(ctx.docker, env, ctx.limits, ctx.pool)
    return True


def build_installs(ctx: PipelineContext, execution_id: str) -> bool:
    """Whether the build step would install a dependency set on this host (the worker
    hands such a build to the host's build pool; any other is done at once in the run
    pool)."""
    with session_scope(ctx.session_factory) as session:
        execution = session.get(Execution, execution_id)
        if execution is None or _finished(execution) or not _has_dependencies(execution):
            return False
        return not (
            execution.dependency_cache_hit and _environment_present(ctx, execution.environment)
        )


def build_step(ctx: PipelineContext, execution_id: str) -> None:
    """Install the dependency set if this host lacks it. Nothing is built for the script."""
    with execution_row(ctx, execution_id) as execution:
        if _finished(execution) or not _has_dependencies(execution):
            return
        if execution.dependency_cache_hit and _environment_present(ctx, execution.environment):
            return
        if execution.status == Status.QUEUED:
            _take_slot(ctx, execution, Status.BUILDING)
            set_status(execution, Status.BUILDING)
    ctx.logs.keep(execution_id)
    _ensure_environment(ctx, execution_id)


def _local_inputs(ctx: PipelineContext, execution: Execution) -> list[tuple[str, Path]]:
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


def _store_outputs(
    ctx: PipelineContext,
    execution: Execution,
    box: sandbox.Box,
    outputs: list[dict],
    store_by: float,
    contents: dict[str, bytes] | None = None,
) -> None:
    """Outputs are blobs of the account too: a file some run already produced is not stored
    twice, and thousands of small ones are stored many at a time (``blobs.store_outputs``).
    Past ``store_by`` (a ``time.monotonic()``) the run is over its time limit: the outputs
    are not recorded, so none of them is half there for the user."""
    folder = str(sandbox_files.output_path(box, "")).rstrip("/")
    blobs.store_outputs(
        ctx.session_factory,
        ctx.store,
        execution.account_id,
        # Strings, not a Path per output: 10,000 of those cost most of a second.
        [(f"{folder}/{output['path']}", output["sha256"], output["size"]) for output in outputs],
        contents={f"{folder}/{path}": data for path, data in (contents or {}).items()},
        store_by=store_by,
        on_late=lambda: sandbox.OutputLimitExceeded(
            f"time limit {execution.timeout_s}s reached while storing {len(outputs)} outputs"
        ),
    )


#: While a run's outputs are read, its sandbox folder's mtime is renewed this often.
HOLD_EVERY_S = 10.0


@dataclasses.dataclass
class _HeldBox(sandbox.Box):
    """An ended sandbox whose ``/work`` is reached through a descriptor held open on it."""

    work_fd: int = -1

    @property
    def work(self) -> Path:
        return Path(f"/proc/self/fd/{self.work_fd}")


@contextlib.contextmanager
def _holding(box: sandbox.Box) -> Iterator[sandbox.Box]:
    """The ended sandbox, held while its outputs are collected and stored. Its container is
    gone by then, and sweepers on this host delete or unmount a folder with no live
    container: ``pool.sweep_folders`` once its mtime is a minute old (renewed here), and any
    installation's ``pool.release_orphaned_disks`` (a test session's end: at once). Storing
    10,000 outputs took longer than either. The yielded box reads ``/work`` through a
    descriptor held on it, which keeps a lazily unmounted filesystem alive and reachable."""
    stop = threading.Event()

    def renew() -> None:
        while True:
            with contextlib.suppress(OSError):
                os.utime(box.host_dir)
            if stop.wait(HOLD_EVERY_S):
                return

    thread = threading.Thread(target=renew, name="rgrid-hold-outputs", daemon=True)
    thread.start()
    try:
        fd = os.open(box.work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        fd = None  # then collecting says what is wrong with the folder
    try:
        if fd is None:
            yield box
        else:
            yield _HeldBox(box.name, box.container_id, box.host_dir, work_fd=fd)
    finally:
        if fd is not None:
            os.close(fd)
        stop.set()
        thread.join()


#: The longest text one log chunk carries: a script's output is cut into chunks no larger,
#: so that a page of chunks stays small (``executions.LOG_PAGE_BYTES``).
MAX_CHUNK_CHARS = 8192


def _capped_log(ctx: PipelineContext, execution_id: str, written: int = 0):
    """The log sink for a running script: the buffer lives in Redis, which is also the broker,
    so a script printing in a loop must not be able to fill it. The cap counts each chunk's
    stored size (``logbuffer.stored_size``: control bytes take six), so it bounds what Redis,
    the object store and a reader hold. Past it, output is dropped with one note saying so."""
    limit = ctx.settings.max_log_bytes

    writer, sequence, lock = secrets.token_hex(8), itertools.count(), threading.Lock()

    def append(stream: str, piece: str) -> None:
        # Patiently: a Redis blip (a worker host's link down for seconds) used to fail the
        # append, the run step was retried, and the script ran a second time after the
        # first run's partial output (tests/integration/test_deploy_hosts.py saw
        # "donedone 3"). The script waits on its full pipe meanwhile; its deadline holds
        # inside the sandbox. Numbered, and in order (the lock), so a chunk sent again
        # after a lost reply is stored once.
        with lock:
            once = (writer, next(sequence))
            patiently(lambda: ctx.logs.append(execution_id, stream, piece, once=once))

    def sink(stream: str, text: str) -> None:
        nonlocal written
        for start in range(0, len(text), MAX_CHUNK_CHARS):
            if written >= limit:
                return
            piece = text[start : start + MAX_CHUNK_CHARS]
            size = stored_size(stream, piece)
            if written + size > limit:
                piece = _fitting(stream, piece, limit - written)
                if piece:
                    append(stream, piece)
                said = (
                    f"log truncated at {human_limit(limit)}: the rest of the script's"
                    " output was dropped"
                )
                ctx.note(execution_id, f"\n{said}")
                # On the row too: a run cut at the log limit is no clean success, and is
                # never recorded for reuse (its replay would lack the rest).
                _mark_log_incomplete(ctx, execution_id, said)
                written = limit
                return
            written += size
            append(stream, piece)

    return sink


def _fitting(stream: str, text: str, room: int) -> str:
    """The longest start of ``text`` whose stored size fits in ``room`` bytes."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if stored_size(stream, text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low]


#: Storing outputs may take this much past the run's own time limit.
OUTPUT_STORE_GRACE_S = 60.0


def _disk_reason(ctx: PipelineContext, path: str) -> str:
    """One line naming the limit a write hit: ``disk limit 4 GiB reached``."""
    limits = ctx.limits
    if path == "/tmp":
        return f"/tmp limit {human_limit(parse_bytes(limits.tmp_size))} reached"
    if path == sandbox.CONTAINER_HOME:
        return f"home folder limit {human_limit(parse_bytes(limits.home_size))} reached"
    return f"disk limit {human_limit(parse_bytes(limits.disk))} reached"


def _end_failed(
    ctx: PipelineContext,
    execution_id: str,
    reason: str,
    warm: bool,
    result: sandbox.RunResult | None = None,
) -> None:
    """The run went over one of its limits: ``failed``, with the limit named, no outputs."""

    def record(execution: Execution) -> None:
        execution.outcome = Status.FAILED
        execution.error = reason
        execution.sandbox_warm = warm
        if result is not None:
            execution.exit_code = result.exit_code
            execution.run_s = round(result.run_s, 3)

    update_execution(ctx, execution_id, record)
    ctx.note(execution_id, reason)


def _cold_box(
    ctx: PipelineContext, env: sandbox.Environment, execution_id: str, timeout_s: int
) -> sandbox.Box:
    """A sandbox started now, for one execution (none was warm, or the warm one failed)."""
    return sandbox_container.start_box(
        ctx.docker,
        env,
        ctx.limits,
        root=ctx.settings.sandboxes_dir,
        idle_s=ctx.settings.pool_idle_s,
        name=f"{sandbox.RUN_NAME_PREFIX}{execution_id}",
        labels=sandbox_container.execution_labels(execution_id, timeout_s),
    )


def _sandbox_for(
    ctx: PipelineContext,
    env: sandbox.Environment,
    execution_id: str,
    timeout_s: int,
    after: ExitStack,
) -> tuple[sandbox.Box, bool]:
    """A warm sandbox from the pool if one is free, else one started now; either way the pool
    is refilled in the background. Returns (sandbox, whether it was warm).

    The refill starts a container, about 0.3 s of the engine's CPU: beside the script, on a
    2-core host, it slowed a numpy import by half. So while a spare warm sandbox is left
    for the next run, the refill waits until ``after`` closes (the result published);
    only a pool this run emptied is refilled at once, so that the next run is warm."""
    limits = ctx.limits
    box, spares = pool.claim_counting_spares(ctx.docker, env, limits, ctx.pool, execution_id)
    warm = box is not None
    (metrics.POOL_CLAIMS if warm else metrics.POOL_MISSES).inc()

    def refill() -> None:
        ctx.background[:] = [t for t in ctx.background if t.is_alive()]
        ctx.background.append(pool.fill_in_background(ctx.docker, env, limits, ctx.pool))

    if box is None:
        ctx.phase(execution_id, "starting a sandbox")
        box = _cold_box(ctx, env, execution_id, timeout_s)
    if spares:
        after.callback(refill)
    else:
        refill()
    return box, warm


def _memory_bytes(ctx: PipelineContext, execution: Execution) -> int:
    return execution.memory_bytes or parse_bytes(ctx.limits.memory)


def _fit_limits(ctx: PipelineContext, execution: Execution, box: sandbox.Box) -> None:
    """A run that chose its own memory or CPUs gets them on the sandbox it claimed."""
    memory, cpus = _memory_bytes(ctx, execution), execution.cpus or ctx.limits.cpus
    if memory != parse_bytes(ctx.limits.memory) or cpus != ctx.limits.cpus:
        sandbox_container.resize(ctx.docker, box, memory, cpus)


class RunWatch:
    """Beside a running script: renews the worker's lease on the execution row (so a lost
    worker is noticed within ``settings.lease_s``) and stops the sandbox as soon as a cancel
    is requested, from this process or any other."""

    INTERVAL_S = 0.5

    def __init__(self, ctx: PipelineContext, execution_id: str, box: sandbox.Box):
        self.ctx, self.execution_id, self.box = ctx, execution_id, box
        self.cancelled = False
        #: Set with ``cancelled``: a runner waiting on the sandbox stops waiting.
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rgrid-run-watch", daemon=True)

    def __enter__(self) -> RunWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        renew_every = max(1.0, self.ctx.settings.lease_s / 6)
        renewed = time.monotonic()
        while not self._stop.wait(self.INTERVAL_S):
            try:
                with session_scope(self.ctx.session_factory) as session:
                    row = session.get(Execution, self.execution_id)
                    if row is None:
                        return
                    if row.cancel_requested:
                        self.cancelled = True
                        sandbox_container.kill(self.ctx.docker, self.box)
                        self.stopped.set()
                        return
                    if time.monotonic() - renewed >= renew_every:
                        row.heartbeat_at = utcnow()
                        renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - a blip must not stop the watch; next tick retries
                log.warning("could not check execution %s", self.execution_id, exc_info=True)


def cancel(ctx: PipelineContext, execution_id: str) -> tuple[str, bool]:
    """Ask for an execution to stop. One that has not started running ends ``cancelled`` at
    once; a running one is stopped by its worker's watch within a second. Returns (status,
    whether anything changed): a finished execution is left as it is."""
    with execution_row(ctx, execution_id) as execution:
        if execution.status in TERMINAL_STATUSES:
            return execution.status, False
        execution.cancel_requested = True
        if execution.status == Status.RUNNING:
            return execution.status, True
    ctx.note(execution_id, "cancelled before it ran")
    _persist_logs(ctx, execution_id)
    with execution_row(ctx, execution_id) as execution:
        execution.log_stored = True
        if execution.status in TERMINAL_STATUSES or execution.status == Status.RUNNING:
            return execution.status, True  # the run step got there first; its watch stops it
        set_status(execution, Status.CANCELLED)
        execution.outcome = Status.CANCELLED
        execution.error = "cancelled"
        execution.finished_at = utcnow()
    metrics.execution_finished(execution)
    _release(ctx, execution_id)
    return Status.CANCELLED, True


class RunElsewhere(Exception):
    """Another copy of this execution's run step is running on this host (a redelivered task
    beside the one still alive): this copy does nothing."""


@contextmanager
def _run_lock(ctx: PipelineContext, execution_id: str) -> Iterator[None]:
    """One run step per execution at a time on this host, across processes: a flock, so a
    killed holder lets go at once and its redelivered step can take over. Raises
    ``RunElsewhere`` when another holds it."""
    import fcntl

    folder = ctx.settings.run_locks_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{execution_id}.lock"
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunElsewhere(execution_id) from None
        try:
            yield
        finally:
            # Unlinked while held: a copy waiting on this file finds the execution over
            # once it gets it (it looks after locking), so a new file is harmless.
            path.unlink(missing_ok=True)


def run_step(
    ctx: PipelineContext, execution_id: str, after: ExitStack | None = None
) -> Execution | None:
    """Claim a sandbox, place the script and inputs, run it once, store what it wrote; its
    environment is held against this host's disk budget the whole time (rgrid/host/envlocks.py).
    The sandbox is removed when ``after`` closes (by default, when this step returns):
    ``run_and_store_step`` closes it once the result is published, so the user does not
    wait for the unmount and the folder's removal. Returns the row as the run left it when
    the script ran (for the store step, which then need not read it again).

    A redelivered step (its runner was killed) re-attaches to the sandbox the script was
    started in, instead of running it again (see ``_reattach``)."""
    with _run_lock(ctx, execution_id):
        with execution_row(ctx, execution_id) as execution:
            if _finished(execution):
                return None
            if execution.cancel_requested:
                execution.outcome = Status.CANCELLED
                execution.error = "cancelled"
                return None
        with (
            ExitStack() as own,
            envlocks.using(ctx.settings.environments_dir, execution.environment),
        ):
            return _run_step(ctx, execution, after if after is not None else own)


def _run_step(ctx: PipelineContext, execution: Execution, after: ExitStack) -> Execution | None:
    execution_id = execution.id
    retried = execution.started_at is not None
    if _has_dependencies(execution) and not _environment_present(ctx, execution.environment):
        # Evicted since the lookup (or the lookup ran on another host): a miss, not an error.
        ctx.note(execution_id, "environment gone from this host: installing it again")
        if not _ensure_environment(ctx, execution_id):
            return
    spec = resolve_runtime(execution.runtime)
    runtime_image = image_id(ctx.docker, spec.image)
    if runtime_image is None:
        _fail_build(
            ctx,
            execution_id,
            f"runtime image {spec.image} is not built on this Docker host: "
            f"run `rgrid runtime build {spec.name}`",
        )
        return
    with execution_row(ctx, execution_id) as execution:
        _take_slot(ctx, execution, Status.RUNNING)
        set_status(execution, Status.RUNNING)
        if execution.started_at is None:
            execution.started_at = utcnow()
        execution.runtime_image = runtime_image[:80]
        execution.worker = ctx.worker_id
        execution.host = ctx.settings.host_name
        execution.heartbeat_at = utcnow()
    ctx.warm(execution.environment)
    if ctx.hosts is not None:
        with contextlib.suppress(Exception):  # only a hint for the API's action keys
            reuse.note_runtime_image(
                ctx.hosts.client, ctx.settings.queue, execution.runtime, runtime_image[:80]
            )
    ctx.logs.keep(execution_id)
    attached = _reattach(ctx, execution, after) if retried else None
    if attached is not None:
        box, warm, result, cancelled = attached
    else:
        box, warm, result, cancelled = _run_afresh(ctx, execution, spec.image, after)
    if cancelled:
        with execution_row(ctx, execution_id) as execution:
            execution.outcome = Status.CANCELLED
            execution.error = "cancelled"
            execution.sandbox_warm = warm
            execution.run_s = round(result.run_s, 3) if result is not None else None
        ctx.note(execution_id, "cancelled: the script was stopped")
        return
    if result is None:
        return  # ended already (its inputs did not fit)
    if result.full:
        # A write was refused at a limit: the run ends here, and what it left half
        # written is not stored.
        _end_failed(ctx, execution_id, _disk_reason(ctx, result.full[0]), warm, result)
        return
    # Collecting and storing outputs count within the run's own time limit (with a
    # grace for a run that used all of it), so a flood of outputs cannot hold the slot.
    store_by = time.monotonic() + max(0.0, execution.timeout_s - result.run_s)
    store_by += OUTPUT_STORE_GRACE_S
    try:
        # The watch renews the lease meanwhile: storing 2,000 outputs outlasted the e2e
        # stack's 4 s lease, and its sweep called the worker lost.
        with _holding(box) as held, RunWatch(ctx, execution_id, box):
            # Small files' bytes are kept as they are hashed: packing them reads none again.
            contents: dict[str, bytes] = {}
            outputs = sandbox_files.collect_outputs(
                held,
                ctx.limits,
                result.notes,
                keep=contents,
                keep_at_most=blobs.PACK_MAX_BLOB_BYTES,
                keep_bytes=blobs.PACKS_AT_ONCE * blobs.PACK_TARGET_BYTES,
            )
            for note in result.notes:
                ctx.note(execution_id, note)
            patiently(lambda: _store_outputs(ctx, execution, held, outputs, store_by, contents))
    except sandbox.OutputLimitExceeded as exc:
        _end_failed(ctx, execution_id, str(exc), warm, result)
        return
    limit = human_limit(_memory_bytes(ctx, execution))
    out_of_memory = f"killed: out of memory (limit {limit})"

    def record(execution: Execution) -> None:
        execution.sandbox_warm = warm
        execution.exit_code = result.exit_code
        execution.run_s = round(result.run_s, 3)
        execution.outputs = outputs
        if result.timed_out:
            execution.outcome = Status.TIMED_OUT
            execution.error = f"timed out after {execution.timeout_s}s"
        else:
            ok = result.exit_code == 0
            execution.outcome = Status.SUCCEEDED if ok else Status.FAILED
            if result.oom_killed and not ok:
                execution.error = out_of_memory
            elif result.oom_killed:
                # It exited 0, but the memory limit killed one of its processes: a success
                # a larger limit might not repeat, so never one to reuse.
                execution.cut_short = out_of_memory

    recorded = update_execution(ctx, execution_id, record)
    if result.timed_out:
        ctx.note(execution_id, f"timed out after {execution.timeout_s}s")
    elif result.oom_killed and result.exit_code != 0:
        ctx.note(execution_id, out_of_memory)
    return recorded


def _run_afresh(
    ctx: PipelineContext, execution: Execution, image: str, after: ExitStack
) -> tuple[sandbox.Box, bool, sandbox.RunResult | None, bool]:
    """Claim a sandbox and run the script in it: (sandbox, warm, result, cancelled). The
    result is None when the run ended before the script started (inputs over the disk)."""
    execution_id = execution.id
    script = _script_bytes(ctx, execution)
    inputs = _local_inputs(ctx, execution)
    disk.touch_all(path for _, path in inputs)
    env = sandbox.Environment(
        image=image,
        deps_dir=(ctx.settings.environments_dir / execution.environment)
        if execution.environment
        else None,
    )
    env_vars = ctx.channels.get_env(execution_id) if execution.env_names else None
    if execution.env_names and env_vars is None:
        raise RGridError("the execution's environment variables expired before it could run")
    box, warm = _sandbox_for(ctx, env, execution_id, execution.timeout_s, after)
    sandbox_reattach.mark_claimed(box, execution_id)
    result: sandbox.RunResult | None = None
    # Late-bound: the sandbox the run ended in (a retry swaps it), and whether it said so.
    after.callback(
        lambda: sandbox_container.discard(
            ctx.docker, box, ended=result is not None and result.ended
        )
    )
    _fit_limits(ctx, execution, box)
    try:
        sandbox_files.place_files(box, [(execution.script_name, script), *inputs], ctx.limits)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        _end_failed(ctx, execution_id, _disk_reason(ctx, "/work") + " by the inputs", warm)
        return box, warm, None, False
    if execution.inputs:
        ctx.note(execution_id, f"placed {len(execution.inputs)} input file(s) in /work")
    entry = ["-m", execution.module] if execution.module else [f"/work/{execution.script_name}"]
    argv = ["python3", *entry, *(execution.args or [])]
    for attempt in (1, 2):
        try:
            with RunWatch(ctx, execution_id, box) as watch:
                result = sandbox_run.run(
                    ctx.docker,
                    box,
                    env,
                    argv=argv,
                    timeout_s=execution.timeout_s,
                    on_output=_capped_log(ctx, execution_id),
                    env_vars=env_vars,
                    stdin=ctx.channels.stdin(execution_id) if execution.stdin else None,
                    cpus=execution.cpus or ctx.limits.cpus,
                    keep_output_bytes=ctx.settings.max_log_bytes,
                )
            break
        except sandbox.SandboxUnresponsive as exc:
            if attempt == 2:
                raise RGridError(str(exc)) from exc
            # The script never started there, so running it elsewhere runs it once.
            log.warning("%s: %s", execution_id, exc)
            ctx.note(execution_id, "the sandbox did not start the script: using a fresh one")
            sandbox_container.discard(ctx.docker, box)
            box, warm = _cold_box(ctx, env, execution_id, execution.timeout_s), False
            sandbox_reattach.mark_claimed(box, execution_id)
            _fit_limits(ctx, execution, box)
            sandbox_files.place_files(box, [(execution.script_name, script), *inputs], ctx.limits)
    return box, warm, result, watch.cancelled


#: The note that starts the script again after an earlier attempt's sandbox was lost: the
#: output before it belongs to that attempt (``_forwarded`` counts from the last one).
RUN_AGAIN_NOTE = "an earlier attempt of this run was interrupted and its sandbox is gone"


def _forwarded(ctx: PipelineContext, execution_id: str) -> tuple[dict[str, int], int]:
    """What the log already holds of the current sandbox's output: characters per stream,
    and their stored size (which the log cap counts)."""
    seen = {"stdout": 0, "stderr": 0}
    size = 0
    for stream, text in ctx.logs.read(execution_id):
        if stream == "system" and text.startswith(RUN_AGAIN_NOTE):
            seen, size = {"stdout": 0, "stderr": 0}, 0
        elif stream in seen:
            seen[stream] += len(text)
            size += stored_size(stream, text)
    return seen, size


def _reattach(
    ctx: PipelineContext, execution: Execution, after: ExitStack
) -> tuple[sandbox.Box, bool | None, sandbox.RunResult | None, bool] | None:
    """An earlier attempt of this run step was interrupted (its pool process or its whole
    worker was killed, and Celery or the lease sweep sent it again). Its sandbox runs the
    script to the end without it, and its supervisor writes the status and keeps the
    output: follow that sandbox to its end, adding to the log only the output the log lacks,
    and take its result. None when there is nothing to follow (the script never started,
    or the sandbox is gone without a result): the caller runs the script afresh, and the
    log says so once."""
    execution_id = execution.id
    box = sandbox_reattach.find_claimed(ctx.docker, ctx.settings.sandboxes_dir, execution_id)
    if box is None:
        # Gone, or on another host (a host whose engine went away moves its runs on).
        ctx.note(execution_id, f"{RUN_AGAIN_NOTE} from this host: running the script again")
        return None
    if not (box.meta / (sandbox.STATUS_FILE + ".started")).exists():
        sandbox_container.discard(ctx.docker, box)
        ctx.note(execution_id, "an earlier attempt of this run ended before the script started")
        return None
    ctx.logs.sync(execution_id)
    seen, size = _forwarded(ctx, execution_id)
    after.callback(lambda: sandbox_container.discard(ctx.docker, box, ended=True))
    ctx.note(execution_id, "an earlier attempt of this run was interrupted: following its sandbox")
    with RunWatch(ctx, execution_id, box) as watch:
        result = sandbox_reattach.reattach(
            ctx.docker,
            box,
            timeout_s=execution.timeout_s,
            on_output=_capped_log(ctx, execution_id, written=size),
            seen=seen,
            stop=watch.stopped,
        )
    if watch.cancelled:
        return box, execution.sandbox_warm, result, True
    if result is None:
        sandbox_container.discard(ctx.docker, box)
        ctx.note(execution_id, f"{RUN_AGAIN_NOTE} without a result: running the script again")
        return None
    if not result.output_kept:
        _log_incomplete(
            ctx, execution_id, "output printed while no runner was reading was not all kept"
        )
    return box, execution.sandbox_warm, result, False


def _log_incomplete(ctx: PipelineContext, execution_id: str, what: str) -> None:
    """Part of the log is gone for good: say so in the log and on the row (the summary)."""
    _mark_log_incomplete(ctx, execution_id, what)
    ctx.note(execution_id, f"log incomplete: {what}")


def _mark_log_incomplete(ctx: PipelineContext, execution_id: str, what: str) -> None:
    """What the stored log lacks, on the row (the summary says it; reuse never records it)."""

    def record(execution: Execution) -> None:
        execution.log_incomplete = (
            what if not execution.log_incomplete else f"{execution.log_incomplete}; {what}"
        )

    update_execution(ctx, execution_id, record)


def _release(ctx: PipelineContext, execution_id: str) -> None:
    """An execution is over: drop its live log (the stored one is complete) and whatever of
    its secrets and stdin still waits for it."""
    ctx.logs.clear(execution_id)
    ctx.channels.forget(execution_id)


def _persist_logs(ctx: PipelineContext, execution_id: str) -> None:
    """The log to the object store, streamed: from this host's journal of it when it keeps
    one (complete even if Redis lost chunks), else from the live buffer one batch of chunks
    at a time."""
    ctx.logs.sync(execution_id)
    if lost := ctx.logs.lost_chunks(execution_id):
        _log_incomplete(
            ctx, execution_id, f"{lost} chunk(s) reached neither the log service nor this host"
        )
    with ctx.logs.journal(execution_id) as journal:
        stream = journal if journal is not None else log_stream(ctx.logs, execution_id)
        ctx.store.put_stream(cache_keys.log_object_key(execution_id), stream)


def _remember_script(session: Session, execution: Execution) -> None:
    """Record (or touch) the script cache row: the next run of these bytes in this environment
    resolves, fetches and builds nothing."""
    row = _script_row(session, execution)
    if row is None:
        row = ScriptCache(
            account_id=execution.account_id,
            runtime=execution.runtime,
            dependency_hash=execution.dependency_hash,
            script_hash=_tree_key(execution),
            use_count=0,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:  # a concurrent run of the same script wrote it first
            row = _script_row(session, execution)
            if row is None:
                return
    row.environment = execution.environment
    row.runtime_image = execution.runtime_image
    row.last_used_at = utcnow()
    # In SQL, not in Python: concurrent runs of one script must each count.
    row.use_count = ScriptCache.use_count + 1


def store_step(ctx: PipelineContext, execution_id: str, execution: Execution | None = None) -> None:
    """Store the log, then touch the cache rows and publish the final status in one
    transaction. ``execution``: the row as the run step just committed it (one read fewer
    on the user's path)."""
    if execution is None:
        with session_scope(ctx.session_factory) as session:
            execution = _load(session, execution_id)
    if execution.status in TERMINAL_STATUSES or execution.outcome is None:
        return  # over, or its run has not ended (another copy of the run step holds it)
    patiently(lambda: _persist_logs(ctx, execution_id))
    published = patiently(lambda: _publish(ctx, execution_id))
    if published is None:
        return
    metrics.execution_finished(published)
    _release(ctx, execution_id)
    if execution.environment:
        # Only now, with the result published: compiling beside the first run took CPU from
        # it (pandas' first run 1.96 s with the compile alongside).
        with contextlib.suppress(docker.errors.DockerException):
            environments.compile_bytecode(
                ctx.docker,
                resolve_runtime(execution.runtime).image,
                ctx.settings.environments_dir / execution.environment,
            )
    disk.after_run(ctx.settings, ctx.docker)


def _publish(ctx: PipelineContext, execution_id: str) -> Execution | None:
    """The final status, with the cache rows the run used touched in the same transaction;
    None if the execution had already ended. Called once its log is stored."""
    with session_scope(ctx.session_factory) as session:
        execution = _load(session, execution_id)
        if execution.status in TERMINAL_STATUSES:
            return None
        ran = execution.outcome in (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT)
        if ran and execution.dependency_hash is not None:
            with cache_tables(ctx, execution_id, session):
                _remember_script(session, execution)
                if _has_dependencies(execution) and (row := _dependency_row(session, execution)):
                    row.last_used_at = utcnow()
                    row.use_count = DependencyCache.use_count + 1
                session.flush()
            for item in execution.inputs or []:
                blob = blobs.find_blob(session, execution.account_id, item["sha256"])
                if blob is not None:
                    blobs.touch(blob)
            with cache_tables(ctx, execution_id, session):
                # The action key from what the run got; a succeeded run's outputs by it.
                reuse.record(session, ctx.settings, execution)
                session.flush()
        set_status(execution, Status(execution.outcome or Status.ERROR))
        execution.finished_at = utcnow()
        execution.log_stored = True
    return execution


def fail(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """Called when a step raised: the execution ends in ``error`` with its log kept."""
    log.error("execution %s failed: %s", execution_id, message)
    stored = False
    try:
        ctx.note(execution_id, f"error: {message}")
        _persist_logs(ctx, execution_id)
        stored = True
    except Exception:  # noqa: BLE001 - the row must still be marked even if the store is down
        log.exception("could not store the log of %s", execution_id)
    with session_scope(ctx.session_factory) as session:
        execution = session.get(Execution, execution_id)
        if execution is None or execution.status in TERMINAL_STATUSES:
            return
        execution.log_stored = stored
        set_status(execution, Status.ERROR)
        execution.outcome = Status.ERROR
        execution.error = message
        execution.finished_at = utcnow()
    metrics.execution_finished(execution)
    _release(ctx, execution_id)


#: What each step does, in a user's words: the message of an internal error names it.
DOING = {
    "hash_step": "reading the script",
    "cache_lookup_step": "looking up the caches",
    "build_step": "installing the dependencies",
    "run_step": "running the script",
    "run_and_store_step": "running the script",
    "store_step": "storing the results",
}


def crashed(ctx: PipelineContext, execution_id: str, exc: BaseException, step: str) -> None:
    """A step raised: the execution ends ``error``. The user reads an RGridError's own words,
    or for anything else only which step failed and the execution id as a reference; the
    detail (a Docker API URL, a connection-pool message) stays in the server's log, under
    that id."""
    doing = DOING.get(step, step)
    message = user_message(exc, doing, execution_id)
    if message != getattr(exc, "message", None):
        log.error(
            "execution %s: internal error while %s: %s: %s",
            execution_id,
            doing,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
    fail(ctx, execution_id, message)


def run_all(ctx: PipelineContext, execution_id: str) -> None:
    """Every step in order, in this process: the embedded default."""
    step = STEPS[0]
    try:
        for step in STEPS:
            while True:
                try:
                    step(ctx, execution_id)
                    break
                except slots.AccountBusy as busy:
                    # In process there is no worker slot to give back: wait here.
                    time.sleep(busy.retry_s)
    except Exception as exc:  # noqa: BLE001 - any bug still ends the execution cleanly
        crashed(ctx, execution_id, exc, step.__name__)


def run_and_store_step(ctx: PipelineContext, execution_id: str) -> None:
    """The run step, then the store step in the same task: an execution's result is published
    the moment its script ends, instead of waiting in the queue behind other executions'
    steps (measured before: run end to final status p50 18 s under 200 queued runs). The
    chain's own store task then finds it done. The sandbox is removed after both."""
    with ExitStack() as after:
        try:
            ran = run_step(ctx, execution_id, after)
        except RunElsewhere:
            log.info("%s: its run step is running in another process here", execution_id)
            return
        store_step(ctx, execution_id, ran)


#: The pipeline in order, as the embedded default runs it in process.
STEPS = (hash_step, cache_lookup_step, build_step, run_and_store_step)


def _end_lost(ctx: PipelineContext, execution_id: str, message: str) -> None:
    """End an execution whose runner is gone: its sandbox (if on this host) and its row."""
    with contextlib.suppress(docker.errors.DockerException, RGridError):
        ctx.docker.api.kill(f"{sandbox.RUN_NAME_PREFIX}{execution_id}")
    fail(ctx, execution_id, message)


#: How many times the lease sweep sends a lost runner's run step back to its host before it
#: gives the execution up as lost.
MAX_RUN_RESENDS = 2


def sweep_lost_workers(
    ctx: PipelineContext, resend: Callable[[str, str | None], None] | None = None
) -> list[str]:
    """Running executions whose worker stopped renewing its lease (killed, or its host died),
    within a minute rather than at the broker's visibility timeout (an hour past the hard
    time limit).

    Its sandbox runs on without it, so while its host is alive (its worker restarted under
    its supervisor, or another process there) the run step is sent back to that host's
    queue with ``resend(execution_id, host)``: it re-attaches to the sandbox, and the script
    runs once (``_reattach``). That happens at most ``MAX_RUN_RESENDS`` times, and once for a
    host not seen alive; an execution past that ends ``error: worker lost`` with its sandbox
    killed, and a redelivered task then finds the row over and does nothing. Returns the
    executions ended."""
    cutoff = utcnow() - timedelta(seconds=ctx.settings.lease_s)
    with session_scope(ctx.session_factory) as session:
        lost = session.execute(
            select(Execution.id, Execution.worker, Execution.host, Execution.run_resends).where(
                Execution.status == Status.RUNNING, Execution.heartbeat_at < cutoff
            )
        ).all()
    ended = []
    for execution_id, worker, host, resends in lost:
        # A host not seen alive gets one lease of grace: its worker may be restarting (a
        # supervised worker beats again a few seconds after it starts).
        most = MAX_RUN_RESENDS if _host_alive(ctx, host) else 1
        if resend is not None and resends < most:
            if _mark_resent(ctx, execution_id, cutoff):
                ctx.note(
                    execution_id,
                    f"worker lost: {worker} stopped while running it; its sandbox is left "
                    "running and the run step goes back to its host",
                )
                resend(execution_id, host)
            continue
        _end_lost(
            ctx, execution_id, f"worker lost: {worker} stopped while running it; run it again"
        )
        ended.append(execution_id)
    return ended


def _host_alive(ctx: PipelineContext, host: str | None) -> bool:
    if ctx.hosts is None or host is None:
        return True
    try:
        return ctx.hosts.alive(host)
    except Exception:  # noqa: BLE001 - Redis away: no resend now; the next sweep looks again
        return False


def _mark_resent(ctx: PipelineContext, execution_id: str, cutoff) -> bool:
    """Count a resend and renew the lease for the step on its way, unless another sweep or
    the runner itself got there first (one conditional UPDATE)."""
    with session_scope(ctx.session_factory) as session:
        result = session.execute(
            update(Execution)
            .where(
                Execution.id == execution_id,
                Execution.status == Status.RUNNING,
                Execution.heartbeat_at < cutoff,
            )
            .values(heartbeat_at=utcnow(), run_resends=Execution.run_resends + 1)
        )
        return result.rowcount == 1


def _process_alive(worker: str | None, host: str) -> bool:
    prefix, _, pid = (worker or "").rpartition(":")
    if prefix != f"embedded:{host}" or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process nobody has reaped yet (a zombie) still answers signal 0.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def recover_interrupted(ctx: PipelineContext) -> list[str]:
    """The embedded default, on start: end what an earlier `rgrid run` on this machine left
    unfinished when it was killed (its sandbox, its row), so nothing waits for ever."""
    host = socket.gethostname()
    with session_scope(ctx.session_factory) as session:
        rows = session.execute(
            select(Execution.id, Execution.worker).where(
                Execution.status.not_in(TERMINAL_STATUSES),
                Execution.worker.like(f"embedded:{host}:%"),
            )
        ).all()
    ended = []
    for execution_id, worker in rows:
        if not _process_alive(worker, host):
            _end_lost(ctx, execution_id, "interrupted: the rgrid process running it was killed")
            ended.append(execution_id)
    return ended


def warm_up(ctx: PipelineContext, runtime: str) -> int:
    """Fill the pool for a runtime with no dependencies (a worker starting up); returns how
    many sandboxes were started. Also clears host folders of sandboxes that are gone."""
    spec = resolve_runtime(runtime)
    if image_id(ctx.docker, spec.image) is None:
        return 0
    pool.sweep_folders(ctx.docker, ctx.settings.sandboxes_dir)
    return pool.fill(ctx.docker, sandbox.Environment(image=spec.image), ctx.limits, ctx.pool)
