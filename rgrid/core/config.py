"""Every setting RGrid reads, in one place.

Settings come from the environment (``RGRID_*``) so that the API, the workers, beat and the CLI
can be pointed at the same services without a config file. Nothing else in the code base reads
``os.environ`` for RGrid settings. Each setting is declared once: a field of ``Settings`` that
names its variable and its default (``setting``); ``Settings.from_env`` reads them all, once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
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


def _number(kind: Callable[[str], N], what: str) -> Callable[[str, str], N]:
    def parse(name: str, raw: str) -> N:
        try:
            return kind(raw)
        except ValueError as exc:
            raise ValueError(f"{name} must be {what}, got {raw!r}") from exc

    return parse


_int = _number(int, "a whole number")
_float = _number(float, "a number")


def _yes(name: str, raw: str) -> bool:
    """Off unless turned on (``1``, ``true``, ``yes``)."""
    return raw in ("1", "true", "yes")


def _unless_no(name: str, raw: str) -> bool:
    """On unless turned off (``0``, ``false``, ``no``)."""
    return raw not in ("0", "false", "no")


def _host_list(name: str, raw: str) -> tuple[str, ...]:
    """Host names, by commas or spaces, in lower case."""
    return tuple(entry.strip().lower() for entry in raw.replace(",", " ").split())


def _user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("rgrid"))


def _converter(kind: Callable[[str], object]) -> Callable[[str, str], object]:
    def parse(name: str, raw: str) -> object:
        return kind(raw)

    return parse


#: How a variable's text becomes a value, by the type of the setting's default.
_PARSERS: dict[type, Callable[[str, str], object]] = {
    int: _int,
    float: _float,
    str: _converter(str),
}


def setting(
    env: str,
    default: object = None,
    parse: Callable[..., object] | None = None,
    *,
    factory: Callable[[], object] | None = None,
):
    """A field of ``Settings`` read from the environment variable ``env`` by ``from_env``
    (unset or empty: ``default``, or ``factory()``): the one place a setting is declared.
    ``parse(name, raw)`` turns the variable's text into a value; by default the default's
    type decides (whole number, number, text; a None default: text)."""
    if parse is None:
        parse = _PARSERS[str if default is None else type(default)]
    elif parse in (Path, str):
        parse = _converter(parse)
    metadata = {"env": env, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment; build one with :meth:`from_env`. Celery's settings in
    celeryconfig.py are built from it too."""

    # Where the CLI sends work. Unset: the embedded default runs everything in process.
    api_url: str | None = setting("RGRID_API_URL", None)
    api_key: str | None = setting("RGRID_API_KEY", None)
    #: How long the CLI keeps retrying an API that is down or answers 503 before it gives up.
    api_retry_s: float = setting("RGRID_API_RETRY", 60.0)

    # Server side (API, workers, beat). The embedded default fills these from data_dir.
    data_dir: Path = setting("RGRID_DATA_DIR", parse=Path, factory=_user_data_dir)
    database_url: str | None = setting("RGRID_DATABASE_URL", None)
    redis_url: str = setting("RGRID_REDIS_URL", "redis://127.0.0.1:6379/0")
    #: Celery's result backend (Flower shows results; RGrid reads none). None: Redis.
    result_backend: str | None = setting("RGRID_RESULT_BACKEND", None)
    #: One Celery queue per deployment; test sessions take their own.
    queue: str = setting("RGRID_QUEUE", "rgrid")
    #: A hard limit per pipeline step, above the longest execution timeout.
    task_time_limit_s: int = setting("RGRID_TASK_TIME_LIMIT", 24 * 3600 + 600)
    #: How often beat reaps sandboxes and executions nobody will finish.
    reap_interval_s: float = setting("RGRID_REAP_INTERVAL_S", 300.0)
    s3_endpoint_url: str | None = setting("RGRID_S3_ENDPOINT_URL", None)
    s3_bucket: str = setting("RGRID_S3_BUCKET", "rgrid")
    s3_region: str = setting("RGRID_S3_REGION", "us-east-1")
    store_dir: Path | None = setting("RGRID_STORE_DIR", None, Path)

    # Sandbox limits for every execution container.
    default_timeout_s: int = setting("RGRID_DEFAULT_TIMEOUT", 600)
    max_timeout_s: int = setting("RGRID_MAX_TIMEOUT", 24 * 3600)
    memory_limit: str = setting("RGRID_MEMORY_LIMIT", "1g")
    cpu_limit: float = setting("RGRID_CPU_LIMIT", 1.0)
    #: The most a user may ask for with ``rgrid run --memory`` / ``--cpus``.
    max_memory_limit: str = setting("RGRID_MAX_MEMORY", "8g")
    max_cpu_limit: float = setting("RGRID_MAX_CPUS", 4.0)
    #: Piped stdin a script may receive; it passes through Redis on its way to the worker.
    max_stdin_bytes: int = setting("RGRID_MAX_STDIN_BYTES", 64 * 1024**2)
    pids_limit: int = setting("RGRID_PIDS_LIMIT", 256)
    tmp_size: str = setting("RGRID_TMP_SIZE", "256m")
    home_size: str = setting("RGRID_HOME_SIZE", "64m")
    #: Everything a script can write in ``/work`` (its inputs and outputs included): a
    #: filesystem of this size per execution, so the kernel refuses the write past it.
    disk_limit: str = setting("RGRID_DISK_LIMIT", "4g")
    max_output_bytes: int = setting("RGRID_MAX_OUTPUT_BYTES", 1024**3)
    #: Files in ``/work/outputs``; a run over it ends ``failed`` and stores none of them.
    #: Bytes (``max_output_bytes``) are the real bound: one file per record or per tile is
    #: common, and each costs one PUT and one GET (issue 24).
    max_output_files: int = setting("RGRID_MAX_OUTPUT_FILES", 100_000)
    #: A log's stored bytes (its JSON lines), per execution; also bounds what it holds in Redis.
    max_log_bytes: int = setting("RGRID_MAX_LOG_BYTES", 64 * 1024**2)
    max_script_bytes: int = setting("RGRID_MAX_SCRIPT_BYTES", 1024**2)
    max_input_file_bytes: int = setting("RGRID_MAX_INPUT_FILE_BYTES", 5 * 1024**3)
    max_input_total_bytes: int = setting("RGRID_MAX_INPUT_TOTAL_BYTES", 20 * 1024**3)
    max_input_files: int = setting("RGRID_MAX_INPUT_FILES", 10_000)
    #: The most files and bytes a script's import closure (its shipped source tree) may hold.
    max_source_files: int = setting("RGRID_MAX_SOURCE_FILES", 2_000)
    max_source_bytes: int = setting("RGRID_MAX_SOURCE_BYTES", 64 * 1024**2)
    #: Small files the submission itself may carry (base64, in all at most this many bytes
    #: before encoding) in place of an upload each: an edited module then costs no round trip
    #: of its own (missing-digests call, presigned PUT, completion). 0: every file is uploaded.
    inline_upload_bytes: int = setting("RGRID_INLINE_UPLOAD_BYTES", 256 * 1024)
    #: Small outputs the final log page itself carries (base64, at most this many bytes in
    #: all): the follower that gets it then fetches them with no GET of its own (a reused
    #: run is one request). 0: every output is fetched from the object store.
    inline_output_bytes: int = setting("RGRID_INLINE_OUTPUT_BYTES", 256 * 1024)
    #: Seconds an API process trusts that a blob's object is in the store after it last saw
    #: it there, before asking again (one HEAD per file per run otherwise); 0: always ask.
    blob_presence_ttl_s: float = setting("RGRID_BLOB_PRESENCE_TTL", 300.0)
    #: The most executions one batch may hold (`rgrid run --batch`), retries included.
    max_batch_executions: int = setting("RGRID_MAX_BATCH_EXECUTIONS", 100_000)
    #: Multipart upload part size: the CLI holds at most one part's read buffer, not the file.
    upload_part_bytes: int = setting("RGRID_UPLOAD_PART_BYTES", 64 * 1024**2)
    container_user: str = "1000:1000"

    # The warm pool: sandboxes started before they are needed, per environment and per host.
    # Two per environment and six in all fit a 2-core host (each idle one holds ~10 MB).
    pool_size: int = setting("RGRID_POOL_SIZE", 2)
    pool_max: int = setting("RGRID_POOL_MAX", 6)
    pool_idle_s: int = setting("RGRID_POOL_IDLE", 600)

    # A running execution's worker renews a lease on its row (every lease/6); one not renewed
    # for this long means the worker is gone, and beat's sweep (every lease/2) ends the
    # execution `error`, never running it twice at once: noticed within 45 s by default.
    lease_s: int = setting("RGRID_LEASE", 30)

    #: Encrypts a script's environment variables (``rgrid run --env``) while they wait in
    #: Redis for their worker; the API and every worker must share it. Unset: a server
    #: refuses ``--env`` rather than keep secrets in clear.
    secret_key: str | None = setting("RGRID_SECRET_KEY", None)
    #: Required as a bearer token by the API's /metrics; unset: /metrics answers loopback only.
    metrics_token: str | None = setting("RGRID_METRICS_TOKEN", None)

    # The embedded default's agent (rgrid/client/agent.py): a local process that keeps the pipeline
    # loaded between `rgrid run`s, so a warm run costs no imports. It ends after this long
    # with nothing to do. RGRID_AGENT=0 runs every command in the CLI's own process.
    agent: bool = setting("RGRID_AGENT", True, _unless_no)
    agent_idle_s: int = setting("RGRID_AGENT_IDLE", 600)

    #: This worker host's name: recorded on each execution it runs, and the name of its own
    #: queue (rgrid/host/hosts.py). One per Docker engine; defaults to the machine's name.
    host_name: str = setting("RGRID_HOST_NAME", parse=str, factory=socket.gethostname)

    # Whether requirements may name a --find-links folder on the worker hosts.
    allow_local_find_links: bool = setting("RGRID_ALLOW_LOCAL_FIND_LINKS", False, _yes)
    #: Package sources (index, find-links and direct URLs) a script's requirements may name
    #: beyond the host's own default index, which is always allowed: host names or
    #: ``host:port``, and ``*`` for any host whose addresses are all public. Loopback, private,
    #: link-local and metadata addresses are refused unless their host is named here.
    allowed_indexes: tuple[str, ...] = setting("RGRID_ALLOWED_INDEXES", (), _host_list)

    #: How long a presigned upload URL stays valid after it is issued.
    upload_url_expiry_s: int = setting("RGRID_UPLOAD_URL_EXPIRY", 600)
    #: Per account: bytes declared by uploads not yet completed, and how many such uploads
    #: may be open at once. A staged upload is unchecked bytes in the bucket: without a cap
    #: one tenant could fill the store with them (issue 24). The CLI keeps at most 8 uploads
    #: open (rgrid/cli/batch.py), each at most ``max_input_file_bytes``.
    max_staged_bytes: int = setting("RGRID_MAX_STAGED_BYTES", 64 * 1024**3)
    max_open_uploads: int = setting("RGRID_MAX_OPEN_UPLOADS", 64)
    #: An upload still open this long after its last URL expired is abandoned: its row and
    #: staged bytes are deleted by the purge of abandoned uploads (celeryconfig.py beat).
    upload_abandon_grace_s: int = setting("RGRID_UPLOAD_ABANDON_GRACE", 600)

    # How long a build waits for another builder of the same key before giving up. The lock's
    # lease is twice that, so a waiter gives up before a live builder's lease can lapse.
    build_lock_timeout_s: int = setting("RGRID_BUILD_LOCK_TIMEOUT", 1800)
    #: Resolving and installing one dependency set: past it uv's process group is killed and
    #: the execution ends ``build_failed`` (an index that trickles bytes held a worker slot
    #: up to Celery's 24 h limit).
    build_timeout_s: int = setting("RGRID_BUILD_TIMEOUT", 600)
    #: A fixed cap on one account's executions running at once, on top of its fair share
    #: of the slots that exist (rgrid/host/slots.py); 0: only the fair share bounds it.
    max_concurrent_per_account: int = setting("RGRID_MAX_CONCURRENT_PER_ACCOUNT", 4)
    #: Run slots per worker host (its run pool's Celery concurrency) and build slots per
    #: host (its build pool's): dependency installs have a pool of their own, so they never
    #: hold the slots runs need. The fair share divides these.
    worker_concurrency: int = setting("RGRID_WORKER_CONCURRENCY", 2)
    build_concurrency: int = setting("RGRID_BUILD_CONCURRENCY", 2)
    #: Which pool this worker process is: "run" (the shared and host queues) or "build"
    #: (the host's build queue only).
    worker_pool: str = setting("RGRID_WORKER_POOL", "run")

    #: Each worker host's Prometheus exporter (served by the Celery worker's main process);
    #: 0: none. Bound to loopback unless the operator names an address for their Prometheus.
    worker_metrics_port: int = setting("RGRID_WORKER_METRICS_PORT", 9464)
    worker_metrics_address: str = setting("RGRID_WORKER_METRICS_ADDRESS", "127.0.0.1")

    #: The disk a host (a worker host, or the embedded default's machine) may fill with
    #: environments and its blob cache; the least recently used go first once it is over.
    cache_budget: str = setting("RGRID_CACHE_BUDGET", "5g")
    #: Entries (cache rows, blobs, environments) unused this long are purged nightly.
    cache_unused_days: int = setting("RGRID_CACHE_UNUSED_DAYS", 30)
    #: Finished executions' logs and outputs are kept this long, then purged with their row.
    retention_days: int = setting("RGRID_RETENTION_DAYS", 30)

    # Instant repeats (rgrid/pipeline/reuse.py): answer a run whose every input is unchanged from a
    # previous succeeded run's outputs. ``reuse_default``: on without ``--reuse``;
    # ``action_cache_salt``: part of every action key, so changing it disowns every entry
    # at once (REAPI's ``salt``).
    reuse_default: bool = setting("RGRID_REUSE_DEFAULT", False, _yes)
    action_cache_salt: str = setting("RGRID_ACTION_CACHE_SALT", "")

    # Folders that default to places under ``data_dir`` (the properties below), unless set.
    uv_cache_override: Path | None = setting("RGRID_UV_CACHE_DIR", None, Path)
    blob_cache_override: Path | None = setting("RGRID_BLOB_CACHE_DIR", None, Path)
    #: prometheus-client's multiprocess folder (its own variable, which it reads when
    #: imported): set by the launcher for the API's processes and for each worker host's.
    metrics_multiproc_dir: Path | None = setting("PROMETHEUS_MULTIPROC_DIR", None, Path)

    @classmethod
    def from_env(cls) -> Settings:
        """Every setting from its variable (``setting``), read once, now: a Settings is a
        snapshot, and none of its properties reads the environment again."""
        values = {}
        for each in fields(cls):
            name = each.metadata.get("env")
            raw = _env(name) if name else None
            if raw is not None:
                values[each.name] = each.metadata["parse"](name, raw)
        return cls(**values)

    @property
    def embedded(self) -> bool:
        """The embedded default: no API to send work to and no server database, so the
        pipeline runs in this process, on this machine's own database, folders and Docker.
        The one answer to "embedded?": the CLI's choice of client, the pipeline context's
        ``embedded`` and the submission checks that trust the user's own machine all ask it.
        A server process (the API, a worker) always has RGRID_DATABASE_URL
        (rgrid/service/context.py refuses to start without it)."""
        return self.api_url is None and not self.database_url

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the embedded default's SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'rgrid.db'}"

    @property
    def uv_cache_dir(self) -> Path:
        """uv's wheel cache on this host, shared by every requirements set."""
        return self.uv_cache_override or self.data_dir / "uv-cache"

    def account_uv_cache_dir(self, account_id: int) -> Path:
        """uv's cache for an account's installs that name their own package sources (a private
        index, credentials, find-links, direct URLs): uv keys its cache by URL without the
        credentials, so a shared one would hand one account's private packages to another.
        Beside the environments, so installs still hard-link."""
        return self.data_dir / "uv-cache-accounts" / str(account_id)

    @property
    def blob_cache_dir(self) -> Path:
        """Verified input blobs on this worker host, by digest: a repeat downloads nothing."""
        return self.blob_cache_override or self.data_dir / "blob-cache"

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
        log of record, which Redis mirrors for following live
        (``redis_logs.JournaledLogBuffer``)."""
        return self.data_dir / "log-journal"

    @property
    def run_locks_dir(self) -> Path:
        """One lock file per execution whose run step is on this host (``watch.run_lock``)."""
        return self.data_dir / "run-locks"

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
