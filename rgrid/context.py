"""Builds the pipeline's surroundings for each way RGrid runs: server side (PostgreSQL, S3,
Redis) or the embedded default (SQLite, a local folder, memory, file locks)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from rgrid.config import Settings, migrations_dir
from rgrid.db import get_session_factory, upgrade
from rgrid.locks import FileLocks, RedisLocks
from rgrid.logbuffer import MemoryLogBuffer, RedisLogBuffer
from rgrid.objectstore import LocalStore, store_from_settings
from rgrid.pipeline import PipelineContext

if TYPE_CHECKING:
    import redis


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    import redis  # the embedded default never needs it

    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def server_context(settings: Settings) -> PipelineContext:
    if not settings.database_url:
        raise RuntimeError("RGRID_DATABASE_URL must be set for the API and the workers")
    store = store_from_settings(settings)
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    client = redis_client(settings.redis_url)
    return PipelineContext(
        settings=settings,
        session_factory=get_session_factory(settings.database_url),
        store=store,
        logs=RedisLogBuffer(client),
        locks=RedisLocks(client, lease_s=2 * settings.build_lock_timeout_s),
    )


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
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.effective_database_url
    _ensure_schema(url)
    return PipelineContext(
        settings=settings,
        session_factory=get_session_factory(url),
        store=LocalStore(settings.effective_store_dir),
        logs=MemoryLogBuffer(),
        locks=FileLocks(settings.data_dir / "locks"),
        # One warm sandbox for the environment just used, so the next run is warm too; it
        # ends itself when idle.
        pool_size=1,
        embedded=True,
    )
