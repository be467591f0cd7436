"""The schema, as SQLAlchemy models. It only ever changes through a migration in migrations/."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with its offset; SQLite (the embedded default) returns stored times
    without one, and they were stored in UTC."""
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat()


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key. Only its sha256 is stored: the key itself is shown once, when issued."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Execution(Base):
    """One run of one script. Its row is the single source of truth for its state."""

    __tablename__ = "executions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    # What the run/build steps found; becomes ``status`` once logs and outputs are stored.
    outcome: Mapped[str | None] = mapped_column(String(20))
    runtime: Mapped[str] = mapped_column(String(40))
    script_name: Mapped[str] = mapped_column(String(255))
    script_hash: Mapped[str] = mapped_column(String(64))
    dependency_hash: Mapped[str | None] = mapped_column(String(64))
    # The normalised requirements (from -r or the script's inline metadata); "" for none.
    requirements: Mapped[str] = mapped_column(Text, default="")
    refresh_deps: Mapped[bool] = mapped_column(Boolean, default=False)
    resolved_dependencies: Mapped[list | None] = mapped_column(JSON)
    input_hash: Mapped[str | None] = mapped_column(String(64))
    # The input manifest: [{"path": relative name in /work, "sha256": ..., "size": ...}].
    inputs: Mapped[list] = mapped_column(JSON, default=list)
    # The local modules shipped with the script ({path, sha256, size}, paths relative to the
    # project root, the entry script not among them) and the digest of the whole tree.
    sources: Mapped[list | None] = mapped_column(JSON)
    source_digest: Mapped[str | None] = mapped_column(String(64))
    # Run as `python -m MODULE` (the entry script is that module's file), or None.
    module: Mapped[str | None] = mapped_column(String(255))
    # Where the CLI found the dependencies ("uv.lock", "pyproject.toml", "-r FILE", ...).
    dependency_source: Mapped[str | None] = mapped_column(String(300))
    files_uploaded: Mapped[int] = mapped_column(Integer, default=0)
    args: Mapped[list] = mapped_column(JSON, default=list)
    timeout_s: Mapped[int] = mapped_column(Integer)
    # Limits chosen for this run (rgrid run --memory/--cpus); None: the operator's defaults.
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cpus: Mapped[float | None] = mapped_column(Float)
    # Whether the client streams stdin to the script (else the script reads EOF at once).
    stdin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Whether the log was written to the object store when the execution ended: a log that
    # was stored and is missing there now is lost (`rgrid logs` says so), one that never was
    # (ended without a pipeline step) is simply empty.
    log_stored: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The names of the variables passed with --env; their values are never stored here.
    env_names: Mapped[list | None] = mapped_column(JSON)
    # The environment it ran in: the installed dependency set's folder name on the worker
    # host (None without dependencies) and the runtime image's id.
    environment: Mapped[str | None] = mapped_column(String(64))
    runtime_image: Mapped[str | None] = mapped_column(String(80))
    # Whether the run found a pre-started sandbox (None until it ran).
    sandbox_warm: Mapped[bool | None] = mapped_column(Boolean)
    script_cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    # None when the script has no dependencies: there is no dependency cache to hit.
    dependency_cache_hit: Mapped[bool | None] = mapped_column(Boolean)
    input_cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    bytes_uploaded: Mapped[int] = mapped_column(BigInteger, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[list] = mapped_column(JSON, default=list)
    deps_build_s: Mapped[float | None] = mapped_column(Float)
    run_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by `rgrid cancel` or a stopped client; the run step watches it.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Which process runs the script (host:pid, or embedded:host:pid), and when it last said
    # it still does: a lease that lets a lost worker be noticed within a minute.
    worker: Mapped[str | None] = mapped_column(String(200))
    # The worker host (settings.host_name) its Docker steps run on: set by the first step that
    # touches Docker, which pins the rest of the execution there.
    host: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How often the lease sweep sent the run step back to its host for a lost runner's
    # successor to re-attach to the sandbox (bounded: past it, the execution is lost).
    run_resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # What the stored log lacks (None: nothing), said in the summary too.
    log_incomplete: Mapped[str | None] = mapped_column(Text)
    # Which limit cut a run short that still exited 0 (the memory limit killed one of its
    # processes), if any: such a run is never recorded for reuse (rgrid/pipeline/reuse.py).
    cut_short: Mapped[str | None] = mapped_column(Text)
    # Its batch (rgrid/service/batches.py), if any; the input it was made for, which names its
    # outputs folder; when the batch handed it to the queue (None: still held back by the
    # batch's ``parallel``); and whether `rgrid batch retry` replaced it with a new attempt.
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_executions_batch_id"), index=True
    )
    batch_item: Mapped[str | None] = mapped_column(String(1024))
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    superseded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Instant repeats (rgrid/pipeline/reuse.py): the action key's parts (digests and names, never an
    # --env value) and the key, what `rgrid why` compares; the succeeded run this one was
    # answered from, without running; whether the output cache was looked up and hit (None:
    # not looked up).
    action_parts: Mapped[dict | None] = mapped_column(JSON)
    action_key: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[str | None] = mapped_column(String(32), index=True)
    output_cache_hit: Mapped[bool | None] = mapped_column(Boolean)


class OutputCache(Base):
    """A succeeded run's result by its action key (``cache_keys.action_key``): the execution
    whose log is replayed and the outputs (blobs of the account, referenced, not copied)
    handed to a later run with the same key."""

    __tablename__ = "output_cache"
    __table_args__ = (UniqueConstraint("account_id", "action_key", name="uq_output_cache_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    action_key: Mapped[str] = mapped_column(String(64))
    execution_id: Mapped[str] = mapped_column(String(32))
    outputs: Mapped[list] = mapped_column(JSON, default=list)
    exit_code: Mapped[int] = mapped_column(Integer, default=0)
    #: What one reuse saves: the original's run time and its outputs' bytes.
    run_s: Mapped[float] = mapped_column(Float, default=0.0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    use_count: Mapped[int] = mapped_column(Integer, default=0)


class Batch(Base):
    """One script over many inputs. It holds what its executions share (``template``) and
    never a count of how they did: that is always computed from their rows."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    script_name: Mapped[str] = mapped_column(String(255))
    script_hash: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(40))
    # At most this many of its executions queued or running at once; None: no bound.
    parallel: Mapped[int | None] = mapped_column(Integer)
    # The validated options every execution of the batch gets (args, requirements, shared
    # inputs, limits): what a page of added inputs and a retry are built from.
    template: Mapped[dict] = mapped_column(JSON)
    # The next execution number: ids are the batch id plus this, so a batch id is a prefix
    # of its executions' ids.
    next_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    # When its inputs were all added and it began to run; None: still being filled.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScriptCache(Base):
    """A script seen before, keyed as the cache contract (docs/design.md) says; its value is the
    environment it ran in. The script itself is stored content-addressed beside it."""

    __tablename__ = "script_cache"
    __table_args__ = (
        UniqueConstraint(
            "account_id", "runtime", "dependency_hash", "script_hash", name="uq_script_cache_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    runtime: Mapped[str] = mapped_column(String(40))
    dependency_hash: Mapped[str] = mapped_column(String(64))
    script_hash: Mapped[str] = mapped_column(String(64))
    # The installed dependency set it ran with (None: none); after --refresh-deps installs
    # another set, a row naming the old one is stale.
    environment: Mapped[str | None] = mapped_column(String(64))
    runtime_image: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    use_count: Mapped[int] = mapped_column(Integer, default=0)


class DependencyCache(Base):
    """A requirements set resolved before: its pins and the folder they are installed in on
    a worker host (named by the resolved set, so a host that lacks it installs the same pins
    again without resolving)."""

    __tablename__ = "dependency_cache"
    __table_args__ = (
        UniqueConstraint(
            "account_id", "runtime", "dependency_hash", name="uq_dependency_cache_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    runtime: Mapped[str] = mapped_column(String(40))
    dependency_hash: Mapped[str] = mapped_column(String(64))
    # None when the set installs nothing (e.g. only requirements for another platform).
    environment: Mapped[str | None] = mapped_column(String(64))
    resolved: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    use_count: Mapped[int] = mapped_column(Integer, default=0)


class Blob(Base):
    """A stored file (input or output), content-addressed per account: the digest is a promise,
    checked before the row is written. Its bytes are the whole object at ``object_key``, or,
    for a small output packed with others (store/output_blobs.py), ``size`` bytes at ``pack_offset``
    of that pack object, which is deleted once no row points into it."""

    __tablename__ = "blobs"
    __table_args__ = (UniqueConstraint("account_id", "digest", name="uq_blob_account_digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(300), index=True)
    # Where its bytes start in the pack at ``object_key``; None: the object is its own.
    pack_offset: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    use_count: Mapped[int] = mapped_column(Integer, default=0)


class Upload(Base):
    """An upload in progress: bytes sent to a staging key, not yet checked against the digest
    they claim. Nothing can reference them until the check passes and a Blob row exists."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(300))
    multipart_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
