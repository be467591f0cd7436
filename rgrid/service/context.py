"""Builds the pipeline's surroundings for each way RGrid runs: server side (PostgreSQL, S3,
Redis) or the embedded default (SQLite, a local folder, memory, file locks)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from rgrid.core.config import Settings, migrations_dir
from rgrid.core.db import get_session_factory, upgrade
from rgrid.core.locks import FileLocks, RedisLocks
from rgrid.host.hosts import HostRegistry
from rgrid.store.channels import MemoryChannels, RedisChannels
from rgrid.store.logbuffer import FileLogBuffer, JournaledLogBuffer, LogBuffer, RedisLogBuffer
from rgrid.store.objectstore import LocalStore, ObjectStore, PresigningStore, store_from_settings

if TYPE_CHECKING:
    import redis

    from rgrid.pipeline.context import PipelineContext


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    import redis  # the embedded default never needs it

    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def log_client(url: str) -> redis.Redis:
    """A worker's connection for live log chunks: no retries and short timeouts, so a Redis
    outage costs a running script's runner one refused connection per chunk (the chunk is
    kept in the host's journal) instead of redis-py's default ten retries with backoff."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    )


@dataclass(frozen=True)
class Services:
    """The server side's services and nothing of the pipeline (no Docker, no builder): all
    the API needs to serve JSON. :meth:`pipeline_context` adds the rest, for a worker."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    logs: LogBuffer
    redis: redis.Redis
    #: Environment variables and stdin on their way from the API to a worker.
    channels: RedisChannels

    def worker_logs(self) -> JournaledLogBuffer:
        """The live log as a worker writes it: Redis without retries, and this host's
        journal of it."""
        return JournaledLogBuffer(
            RedisLogBuffer(log_client(self.settings.redis_url)), self.settings.log_journal_dir
        )

    def writing(self) -> Services:
        """These services with the log a worker writes through: what the API cancels with,
        storing an execution's log as a worker would (and without the pipeline's steps)."""
        return replace(self, logs=self.worker_logs())

    def pipeline_context(self) -> PipelineContext:
        from rgrid.pipeline.context import PipelineContext  # docker-py and the builder with it

        return PipelineContext(
            settings=self.settings,
            session_factory=self.session_factory,
            store=self.store,
            logs=self.worker_logs(),
            locks=RedisLocks(self.redis, lease_s=2 * self.settings.build_lock_timeout_s),
            channels=self.channels,
            hosts=HostRegistry(self.redis, self.settings.queue),
        )


def server_services(settings: Settings) -> Services:
    if not settings.database_url:
        raise RuntimeError("RGRID_DATABASE_URL must be set for the API and the workers")
    store = store_from_settings(settings)
    if isinstance(store, PresigningStore):
        store.ensure_bucket()
    client = redis_client(settings.redis_url)
    return Services(
        settings=settings,
        session_factory=get_session_factory(settings.database_url),
        store=store,
        logs=RedisLogBuffer(client),
        redis=client,
        channels=RedisChannels(client, settings.secret_key, settings.max_stdin_bytes),
    )


def server_context(settings: Settings) -> PipelineContext:
    """A worker's surroundings: PostgreSQL, S3, Redis (logs and build locks), Docker."""
    return server_services(settings).pipeline_context()


def _ensure_schema(url: str) -> None:
    """Migrate the embedded database unless it was migrated with exactly these migrations.
    Asking Alembic every time would cost ~0.2 s of each `rgrid run` just to import it."""
    migrations = ",".join(sorted(p.name for p in (migrations_dir() / "versions").glob("*.py")))
    db_file = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    stamp = db_file.with_name(db_file.name + ".migrated") if db_file else None
    if (
        db_file
        and stamp
        and db_file.exists()
        and stamp.exists()
        and stamp.read_text() == migrations
    ):
        return
    upgrade(url)
    if stamp:
        stamp.write_text(migrations)


def embedded_context(settings: Settings) -> PipelineContext:
    """Everything under the user's data directory; the schema is migrated on first use."""
    from rgrid.core import metrics
    from rgrid.pipeline.context import PipelineContext

    metrics.disable()  # nobody scrapes a CLI process
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.effective_database_url
    _ensure_schema(url)
    return PipelineContext(
        settings=settings,
        session_factory=get_session_factory(url),
        store=LocalStore(settings.effective_store_dir),
        logs=FileLogBuffer(settings.data_dir / "logs"),
        locks=FileLocks(settings.data_dir / "locks"),
        channels=MemoryChannels(),
        # One warm sandbox for the environment just used, so the next run is warm too; it
        # ends itself when idle.
        pool_size=1,
        embedded=True,
    )
