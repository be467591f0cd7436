"""Every setting RGrid reads, in one place.

Settings come from the environment (``RGRID_*``) so that the API, the workers, beat and the CLI
can be pointed at the same services without a config file. Nothing else in the code base reads
``os.environ`` for RGrid settings.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import platformdirs

N = TypeVar("N", int, float)

#: The runtime a script gets when none is named.
DEFAULT_RUNTIME = "python:3.11"


def migrations_dir() -> Path:
    """The Alembic folder: the top-level ``migrations`` package, which the wheel installs beside
    ``rgrid`` (a checkout has it in the same place)."""
    import migrations

    return Path(migrations.__file__).resolve().parent


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_number(name: str, default: N, kind: Callable[[str], N], what: str) -> N:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from exc


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "a whole number")


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment; build one with :meth:`from_env`. Celery's settings in
    celeryconfig.py are built from it too."""

    # Where the CLI sends work. Unset: the embedded default runs everything in process.
    api_url: str | None = None
    api_key: str | None = None
    #: How long the CLI keeps retrying an API that is down or answers 503 before it gives up.
    api_retry_s: float = 60.0

    # Server side (API, workers, beat). The embedded default fills these from data_dir.
    data_dir: Path = field(default_factory=lambda: Path(platformdirs.user_data_dir("rgrid")))
    database_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery's result backend (Flower shows results; RGrid reads none). None: Redis.
    result_backend: str | None = None
    #: One Celery queue per deployment; test sessions take their own.
    queue: str = "rgrid"
    #: A hard limit per pipeline step, above the longest execution timeout.
    task_time_limit_s: int = 24 * 3600 + 600
    #: How often beat reaps sandboxes and executions nobody will finish.
    reap_interval_s: float = 300.0
    s3_endpoint_url: str | None = None
    s3_bucket: str = "rgrid"
    s3_region: str = "us-east-1"
    store_dir: Path | None = None

    # Sandbox limits for every execution container.
    default_timeout_s: int = 600
    max_timeout_s: int = 24 * 3600
    memory_limit: str = "1g"
    cpu_limit: float = 1.0
    #: The most a user may ask for with ``rgrid run --memory`` / ``--cpus``.
    max_memory_limit: str = "8g"
    max_cpu_limit: float = 4.0
    #: Piped stdin a script may receive; it passes through Redis on its way to the worker.
    max_stdin_bytes: int = 64 * 1024**2
    pids_limit: int = 256
    tmp_size: str = "256m"
    home_size: str = "64m"
    #: Everything a script can write in ``/work`` (its inputs and outputs included): a
    #: filesystem of this size per execution, so the kernel refuses the write past it.
    disk_limit: str = "4g"
    max_output_bytes: int = 1024**3
    #: Files in ``/work/outputs``; a run over it ends ``failed`` and stores none of them.
    #: Bytes (``max_output_bytes``) are the real bound: one file per record or per tile is
    #: common, and each costs one PUT and one GET (issue 24).
    max_output_files: int = 100_000
    #: A log's stored bytes (its JSON lines), per execution; also bounds what it holds in Redis.
    max_log_bytes: int = 64 * 1024**2
    max_script_bytes: int = 1024**2
    max_input_file_bytes: int = 5 * 1024**3
    max_input_total_bytes: int = 20 * 1024**3
    max_input_files: int = 10_000
    #: The most files and bytes a script's import closure (its shipped source tree) may hold.
    max_source_files: int = 2_000
    max_source_bytes: int = 64 * 1024**2
    #: Small files the submission itself may carry (base64, in all at most this many bytes
    #: before encoding) in place of an upload each: an edited module then costs no round trip
    #: of its own (missing-digests call, presigned PUT, completion). 0: every file is uploaded.
    inline_upload_bytes: int = 256 * 1024
    #: Seconds an API process trusts that a blob's object is in the store after it last saw
    #: it there, before asking again (one HEAD per file per run otherwise); 0: always ask.
    blob_presence_ttl_s: float = 300.0
    #: The most executions one batch may hold (`rgrid run --batch`), retries included.
    max_batch_executions: int = 100_000
    #: Multipart upload part size: the CLI holds at most one part's read buffer, not the file.
    upload_part_bytes: int = 64 * 1024**2
    container_user: str = "1000:1000"

    # The warm pool: sandboxes started before they are needed, per environment and per host.
    # Two per environment and six in all fit a 2-core host (each idle one holds ~10 MB).
    pool_size: int = 2
    pool_max: int = 6
    pool_idle_s: int = 600

    # A running execution's worker renews a lease on its row (every lease/6); one not renewed
    # for this long means the worker is gone, and beat's sweep (every lease/2) ends the
    # execution `error`, never running it twice at once: noticed within 45 s by default.
    lease_s: int = 30

    #: Encrypts a script's environment variables (``rgrid run --env``) while they wait in
    #: Redis for their worker; the API and every worker must share it. Unset: a server
    #: refuses ``--env`` rather than keep secrets in clear.
    secret_key: str | None = None
    #: Required as a bearer token by the API's /metrics; unset: /metrics answers loopback only.
    metrics_token: str | None = None

    # The embedded default's agent (rgrid/client/agent.py): a local process that keeps the pipeline
    # loaded between `rgrid run`s, so a warm run costs no imports. It ends after this long
    # with nothing to do. RGRID_AGENT=0 runs every command in the CLI's own process.
    agent: bool = True
    agent_idle_s: int = 600

    #: This worker host's name: recorded on each execution it runs, and the name of its own
    #: queue (rgrid/host/hosts.py). One per Docker engine; defaults to the machine's name.
    host_name: str = field(default_factory=socket.gethostname)

    # Whether requirements may name a --find-links folder on the worker hosts.
    allow_local_find_links: bool = False
    #: Package sources (index, find-links and direct URLs) a script's requirements may name
    #: beyond the host's own default index, which is always allowed: host names or
    #: ``host:port``, and ``*`` for any host whose addresses are all public. Loopback, private,
    #: link-local and metadata addresses are refused unless their host is named here.
    allowed_indexes: tuple[str, ...] = ()

    #: How long a presigned upload URL stays valid after it is issued.
    upload_url_expiry_s: int = 600
    #: Per account: bytes declared by uploads not yet completed, and how many such uploads
    #: may be open at once. A staged upload is unchecked bytes in the bucket: without a cap
    #: one tenant could fill the store with them (issue 24). The CLI keeps at most 8 uploads
    #: open (rgrid/cli/batch.py), each at most ``max_input_file_bytes``.
    max_staged_bytes: int = 64 * 1024**3
    max_open_uploads: int = 64
    #: An upload still open this long after its last URL expired is abandoned: its row and
    #: staged bytes are deleted by the purge of abandoned uploads (celeryconfig.py beat).
    upload_abandon_grace_s: int = 600

    # How long a build waits for another builder of the same key before giving up. The lock's
    # lease is twice that, so a waiter gives up before a live builder's lease can lapse.
    build_lock_timeout_s: int = 1800
    #: Resolving and installing one dependency set: past it uv's process group is killed and
    #: the execution ends ``build_failed`` (an index that trickles bytes held a worker slot
    #: up to Celery's 24 h limit).
    build_timeout_s: int = 600
    #: A fixed cap on one account's executions running at once, on top of its fair share
    #: of the slots that exist (rgrid/host/slots.py); 0: only the fair share bounds it.
    max_concurrent_per_account: int = 4
    #: Run slots per worker host (its run pool's Celery concurrency) and build slots per
    #: host (its build pool's): dependency installs have a pool of their own, so they never
    #: hold the slots runs need. The fair share divides these.
    worker_concurrency: int = 2
    build_concurrency: int = 2
    #: Which pool this worker process is: "run" (the shared and host queues) or "build"
    #: (the host's build queue only).
    worker_pool: str = "run"

    #: Each worker host's Prometheus exporter (served by the Celery worker's main process);
    #: 0: none. Bound to loopback unless the operator names an address for their Prometheus.
    worker_metrics_port: int = 9464
    worker_metrics_address: str = "127.0.0.1"

    #: The disk a host (a worker host, or the embedded default's machine) may fill with
    #: environments and its blob cache; the least recently used go first once it is over.
    cache_budget: str = "5g"
    #: Entries (cache rows, blobs, environments) unused this long are purged nightly.
    cache_unused_days: int = 30
    #: Finished executions' logs and outputs are kept this long, then purged with their row.
    retention_days: int = 30

    # Instant repeats (rgrid/pipeline/reuse.py): answer a run whose every input is unchanged from a
    # previous succeeded run's outputs. ``reuse_default``: on without ``--reuse``;
    # ``action_cache_salt``: part of every action key, so changing it disowns every entry
    # at once (REAPI's ``salt``).
    reuse_default: bool = False
    action_cache_salt: str = ""

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(_env("RGRID_DATA_DIR") or platformdirs.user_data_dir("rgrid"))
        store_dir = _env("RGRID_STORE_DIR")
        return cls(
            api_url=_env("RGRID_API_URL"),
            api_key=_env("RGRID_API_KEY"),
            api_retry_s=_env_float("RGRID_API_RETRY", cls.api_retry_s),
            data_dir=data_dir,
            database_url=_env("RGRID_DATABASE_URL"),
            redis_url=_env("RGRID_REDIS_URL", cls.redis_url),
            result_backend=_env("RGRID_RESULT_BACKEND"),
            queue=_env("RGRID_QUEUE", cls.queue),
            task_time_limit_s=_env_int("RGRID_TASK_TIME_LIMIT", cls.task_time_limit_s),
            reap_interval_s=_env_float("RGRID_REAP_INTERVAL_S", cls.reap_interval_s),
            s3_endpoint_url=_env("RGRID_S3_ENDPOINT_URL"),
            s3_bucket=_env("RGRID_S3_BUCKET", cls.s3_bucket),
            s3_region=_env("RGRID_S3_REGION", cls.s3_region),
            store_dir=Path(store_dir) if store_dir else None,
            default_timeout_s=_env_int("RGRID_DEFAULT_TIMEOUT", cls.default_timeout_s),
            max_timeout_s=_env_int("RGRID_MAX_TIMEOUT", cls.max_timeout_s),
            memory_limit=_env("RGRID_MEMORY_LIMIT", cls.memory_limit),
            cpu_limit=_env_float("RGRID_CPU_LIMIT", cls.cpu_limit),
            max_memory_limit=_env("RGRID_MAX_MEMORY", cls.max_memory_limit),
            max_cpu_limit=_env_float("RGRID_MAX_CPUS", cls.max_cpu_limit),
            max_stdin_bytes=_env_int("RGRID_MAX_STDIN_BYTES", cls.max_stdin_bytes),
            secret_key=_env("RGRID_SECRET_KEY"),
            metrics_token=_env("RGRID_METRICS_TOKEN"),
            pids_limit=_env_int("RGRID_PIDS_LIMIT", cls.pids_limit),
            tmp_size=_env("RGRID_TMP_SIZE", cls.tmp_size),
            home_size=_env("RGRID_HOME_SIZE", cls.home_size),
            pool_size=_env_int("RGRID_POOL_SIZE", cls.pool_size),
            pool_max=_env_int("RGRID_POOL_MAX", cls.pool_max),
            pool_idle_s=_env_int("RGRID_POOL_IDLE", cls.pool_idle_s),
            lease_s=_env_int("RGRID_LEASE", cls.lease_s),
            disk_limit=_env("RGRID_DISK_LIMIT", cls.disk_limit),
            max_output_bytes=_env_int("RGRID_MAX_OUTPUT_BYTES", cls.max_output_bytes),
            max_output_files=_env_int("RGRID_MAX_OUTPUT_FILES", cls.max_output_files),
            max_log_bytes=_env_int("RGRID_MAX_LOG_BYTES", cls.max_log_bytes),
            max_script_bytes=_env_int("RGRID_MAX_SCRIPT_BYTES", cls.max_script_bytes),
            max_input_file_bytes=_env_int("RGRID_MAX_INPUT_FILE_BYTES", cls.max_input_file_bytes),
            max_input_total_bytes=_env_int(
                "RGRID_MAX_INPUT_TOTAL_BYTES", cls.max_input_total_bytes
            ),
            max_input_files=_env_int("RGRID_MAX_INPUT_FILES", cls.max_input_files),
            max_source_files=_env_int("RGRID_MAX_SOURCE_FILES", cls.max_source_files),
            max_source_bytes=_env_int("RGRID_MAX_SOURCE_BYTES", cls.max_source_bytes),
            inline_upload_bytes=_env_int("RGRID_INLINE_UPLOAD_BYTES", cls.inline_upload_bytes),
            blob_presence_ttl_s=_env_float("RGRID_BLOB_PRESENCE_TTL", cls.blob_presence_ttl_s),
            max_batch_executions=_env_int("RGRID_MAX_BATCH_EXECUTIONS", cls.max_batch_executions),
            host_name=_env("RGRID_HOST_NAME") or socket.gethostname(),
            upload_part_bytes=_env_int("RGRID_UPLOAD_PART_BYTES", cls.upload_part_bytes),
            build_lock_timeout_s=_env_int("RGRID_BUILD_LOCK_TIMEOUT", cls.build_lock_timeout_s),
            worker_metrics_port=_env_int("RGRID_WORKER_METRICS_PORT", cls.worker_metrics_port),
            worker_metrics_address=_env("RGRID_WORKER_METRICS_ADDRESS", cls.worker_metrics_address),
            cache_budget=_env("RGRID_CACHE_BUDGET", cls.cache_budget),
            cache_unused_days=_env_int("RGRID_CACHE_UNUSED_DAYS", cls.cache_unused_days),
            retention_days=_env_int("RGRID_RETENTION_DAYS", cls.retention_days),
            reuse_default=_env("RGRID_REUSE_DEFAULT", "0") in ("1", "true", "yes"),
            action_cache_salt=_env("RGRID_ACTION_CACHE_SALT") or "",
            agent=_env("RGRID_AGENT", "1") not in ("0", "false", "no"),
            agent_idle_s=_env_int("RGRID_AGENT_IDLE", cls.agent_idle_s),
            build_timeout_s=_env_int("RGRID_BUILD_TIMEOUT", cls.build_timeout_s),
            max_concurrent_per_account=_env_int(
                "RGRID_MAX_CONCURRENT_PER_ACCOUNT", cls.max_concurrent_per_account
            ),
            worker_concurrency=_env_int("RGRID_WORKER_CONCURRENCY", cls.worker_concurrency),
            build_concurrency=_env_int("RGRID_BUILD_CONCURRENCY", cls.build_concurrency),
            worker_pool=_env("RGRID_WORKER_POOL", cls.worker_pool),
            allow_local_find_links=_env("RGRID_ALLOW_LOCAL_FIND_LINKS", "0")
            in ("1", "true", "yes"),
            allowed_indexes=tuple(
                entry.strip().lower()
                for entry in (_env("RGRID_ALLOWED_INDEXES") or "").replace(",", " ").split()
            ),
            upload_url_expiry_s=_env_int("RGRID_UPLOAD_URL_EXPIRY", cls.upload_url_expiry_s),
            max_staged_bytes=_env_int("RGRID_MAX_STAGED_BYTES", cls.max_staged_bytes),
            max_open_uploads=_env_int("RGRID_MAX_OPEN_UPLOADS", cls.max_open_uploads),
            upload_abandon_grace_s=_env_int(
                "RGRID_UPLOAD_ABANDON_GRACE", cls.upload_abandon_grace_s
            ),
        )

    @property
    def embedded(self) -> bool:
        """True when the CLI should run the pipeline in process (no API configured)."""
        return self.api_url is None

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the embedded default's SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'rgrid.db'}"

    @property
    def uv_cache_dir(self) -> Path:
        """uv's wheel cache on this host, shared by every requirements set."""
        return Path(_env("RGRID_UV_CACHE_DIR") or self.data_dir / "uv-cache")

    def account_uv_cache_dir(self, account_id: int) -> Path:
        """uv's cache for an account's installs that name their own package sources (a private
        index, credentials, find-links, direct URLs): uv keys its cache by URL without the
        credentials, so a shared one would hand one account's private packages to another.
        Beside the environments, so installs still hard-link."""
        return self.data_dir / "uv-cache-accounts" / str(account_id)

    @property
    def blob_cache_dir(self) -> Path:
        """Verified input blobs on this worker host, by digest: a repeat downloads nothing."""
        return Path(_env("RGRID_BLOB_CACHE_DIR") or self.data_dir / "blob-cache")

    @property
    def environments_dir(self) -> Path:
        """Installed dependency sets on this host, one folder each. On the same filesystem as
        the uv cache, so installs hard-link instead of copying."""
        return self.data_dir / "environments"

    @property
    def sandboxes_dir(self) -> Path:
        """The host folders behind each sandbox's ``/work``."""
        return self.data_dir / "sandboxes"

    @property
    def log_journal_dir(self) -> Path:
        """A worker host's own copy of the logs of the executions it builds and runs: the
        log of record, which Redis mirrors for following live (``logbuffer.JournaledLogBuffer``)."""
        return self.data_dir / "log-journal"

    @property
    def run_locks_dir(self) -> Path:
        """One lock file per execution whose run step is on this host (``watch.run_lock``)."""
        return self.data_dir / "run-locks"

    @property
    def metrics_multiproc_dir(self) -> Path | None:
        """prometheus-client's multiprocess folder (its own variable, which it reads when
        imported): set by the launcher for the API's processes and for each worker host's."""
        value = _env("PROMETHEUS_MULTIPROC_DIR")
        return Path(value) if value else None

    @property
    def cache_budget_bytes(self) -> int:
        from rgrid.core.units import parse_bytes

        return parse_bytes(self.cache_budget)

    @property
    def effective_store_dir(self) -> Path:
        return self.store_dir or self.data_dir / "store"


#: What the embedded agent inherits from the shell that starts it: a shell whose values differ
#: gets an agent of its own (rgrid/client/agent_client.py names agents by this).
AGENT_ENV_PREFIXES = ("RGRID_", "DOCKER_", "UV_", "PATH")


def agent_environment() -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in os.environ.items() if k.startswith(AGENT_ENV_PREFIXES))


def get_settings() -> Settings:
    return Settings.from_env()
