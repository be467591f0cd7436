"""Engine and session handling, shared by the API, the workers and the embedded default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rgrid.core.config import migrations_dir
from rgrid.core.errors import ServiceUnavailable

if TYPE_CHECKING:
    from alembic.config import Config


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (and so one pool) per database URL per process."""
    if url not in _ENGINES:
        _ENGINES[url] = _create_engine(url)
    return _ENGINES[url]


def forget_engines_after_fork() -> None:
    """In a process just forked from one that used the database: drop the inherited pools
    without closing the parent's connections (SQLAlchemy's advice), so that no socket is
    ever shared between two processes."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            # WAL lets the CLI read an execution while the pipeline thread writes it.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


_SERIALIZED: dict[str, sessionmaker[Session]] = {}


def serialized_session_factory(url: str) -> sessionmaker[Session]:
    """For a SQLite database written by several threads at once (an embedded batch): each
    transaction begins with ``BEGIN IMMEDIATE``, so transactions take turns from their start
    (waiting up to the busy timeout). SQLite's default deferred transaction that read and then
    writes fails at once with "database is locked" when another connection wrote meanwhile,
    which two pipelines in one process did here; and SQLite has no ``SELECT ... FOR UPDATE``,
    so this is also what serializes a batch's dispatchers. (SQLAlchemy's recipe for pysqlite:
    the driver's own transaction handling off, the BEGIN emitted on the "begin" event.)"""
    if not url.startswith("sqlite"):
        return get_session_factory(url)
    if url not in _SERIALIZED:
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 60, "isolation_level": None}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:  # pragma: no cover - trivial
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        _SERIALIZED[url] = sessionmaker(bind=engine, expire_on_commit=False)
    return _SERIALIZED[url]


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise ServiceUnavailable(f"database unavailable: {exc.orig}".splitlines()[0]) from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    """Alembic's configuration built here, not read from alembic.ini: an installed RGrid has
    no ini file, only the installed ``migrations`` package."""
    # Imported here: Alembic costs ~0.3 s to import, and only migrations need it.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> list[str]:
    """Bring the schema at ``url`` to the newest migration (the only way it ever changes);
    returns the migrations this call applied. Safe from many hosts at once on PostgreSQL:
    migrations/env.py serializes them under an advisory lock, and a host that waited finds
    nothing left to apply."""
    from alembic import command

    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    return list(cfg.attributes.get("applied", []))


def schema_revision(url: str) -> str | None:
    """The migration the database at ``url`` is at (None: none applied yet)."""
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def newest_revision() -> str:
    """The newest migration this installation ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head
