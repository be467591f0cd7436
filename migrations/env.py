"""Alembic environment: the schema's only way to change."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from rgrid.core.cache_keys import MIGRATION_LOCK_ID
from rgrid.core.config import get_settings
from rgrid.core.models import Base

config = context.config
target_metadata = Base.metadata

if not config.get_main_option("sqlalchemy.url"):
    url = get_settings().effective_database_url
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        # Batch mode lets later ALTERs work on SQLite, the embedded default's database.
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            # What this run applied, for `rgrid admin migrate` to report (rgrid/core/db.py).
            on_version_apply=lambda step, **_: config.attributes.setdefault("applied", []).append(
                step.up_revision_id
            ),
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Every host may run `rgrid admin migrate` at once: the first takes the lock
                # and migrates; the others wait here, then read the version it committed
                # (run_migrations reads it only now) and have nothing to do. Released at
                # commit, or when a killed migrator's connection closes.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
                )
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
