"""The models and the migrations never disagree."""

import secrets
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from rgrid.core.db import upgrade
from rgrid.core.models import Base


def _diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return diff


def test_postgres_schema_from_migrations_matches_models(database_url):
    assert _diff(database_url) == []


def test_sqlite_schema_from_migrations_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    assert _diff(url) == []


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path, database_url):
    """A database with no schema yet, of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    name = f"rgrid_mig_{secrets.token_hex(4)}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield database_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_image_era_rows_migrate_to_environments(empty_database):
    """Executions of the image era stay readable; cache rows that named images (which no
    longer exist) are dropped, so the next run repopulates them; and back down again."""
    from alembic import command

    from rgrid.core.db import alembic_config
    from rgrid.core.models import Execution, ScriptCache
    from rgrid.service.executions import execution_to_dict

    config = alembic_config(empty_database)
    command.upgrade(config, "0003")
    engine = create_engine(empty_database)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO accounts (id, name, created_at) VALUES (7, 'old', :now)"),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO executions (id, account_id, status, runtime, script_name,"
                " script_hash, args, timeout_s, image_ref, script_cache_hit,"
                " dependency_cache_hit, input_cache_hit, bytes_uploaded, exit_code, outputs,"
                " build_s, run_s, created_at, requirements, refresh_deps, dependency_image)"
                " VALUES ('e1', 7, 'succeeded', 'python:3.11', 'job.py', :h, '[]', 60,"
                " 'rgrid-exec:abc', true, false, false, 0, 0, '[]', 1.5, 0.2, :now, '', false,"
                " NULL)"
            ),
            {"h": "a" * 64, "now": now},
        )
        conn.execute(
            text(
                "INSERT INTO script_cache (account_id, runtime, dependency_hash, script_hash,"
                " image_ref, created_at, last_used_at, use_count)"
                " VALUES (7, 'python:3.11', :d, :h, 'rgrid-exec:abc', :now, :now, 1)"
            ),
            {"d": "d" * 64, "h": "a" * 64, "now": now},
        )
        conn.execute(
            text(
                "INSERT INTO dependency_cache (account_id, runtime, dependency_hash, image_ref,"
                " resolved, created_at, last_used_at, use_count)"
                " VALUES (7, 'python:3.11', :d, 'rgrid-deps:abc', '[]', :now, :now, 1)"
            ),
            {"d": "d" * 64, "now": now},
        )
    command.upgrade(config, "head")
    with Session(engine) as session:
        row = execution_to_dict(session.get(Execution, "e1"))
        assert row["status"] == "succeeded" and row["exit_code"] == 0
        assert row["environment"] is None and row["runtime_image"] is None
        assert "image_ref" not in row and "build_s" not in row
        assert session.query(ScriptCache).count() == 0
        assert session.execute(text("SELECT count(*) FROM dependency_cache")).scalar() == 0
    command.downgrade(config, "0003")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM executions")).scalars().all() == ["succeeded"]
    command.upgrade(config, "head")
    assert _diff(empty_database) == []
    engine.dispose()


def test_finished_rows_from_before_log_stored_expect_their_log(empty_database):
    """0011's backfill: a finished execution's log is expected in the store (so a missing one
    is reported lost), except where no step ever wrote one: a batch's queued execution
    cancelled in bulk, an execution the sweep ended as lost; nor while one still runs."""
    from alembic import command

    from rgrid.core.db import alembic_config

    config = alembic_config(empty_database)
    command.upgrade(config, "0008")
    engine = create_engine(empty_database)
    now = datetime.now(UTC)
    rows = {
        # id: (status, error, batch_id, started_at, finished_at)
        "ran": ("succeeded", None, None, now, now),
        "failed": ("error", "internal error while running the script", None, now, now),
        "queued-cancel": ("cancelled", "cancelled", None, None, now),
        "bulk-cancel": ("cancelled", "cancelled", "b1", None, now),
        "swept": (
            "error",
            "lost: no worker finished this execution; run it again",
            None,
            None,
            now,
        ),
        "running": ("running", None, None, now, None),
    }
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO accounts (id, name, created_at) VALUES (7, 'old', :now)"),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO batches (id, account_id, script_name, script_hash, runtime,"
                " template, created_at) VALUES ('b1', 7, 'job.py', :h, 'python:3.11', '{}', :now)"
            ),
            {"h": "a" * 64, "now": now},
        )
        for execution_id, (status, error, batch_id, started, finished) in rows.items():
            conn.execute(
                text(
                    "INSERT INTO executions (id, account_id, status, runtime, script_name,"
                    " script_hash, args, timeout_s, script_cache_hit, input_cache_hit,"
                    " bytes_uploaded, outputs, created_at, error, batch_id, started_at,"
                    " finished_at) VALUES (:id, 7, :status, 'python:3.11', 'job.py', :h, '[]',"
                    " 60, false, false, 0, '[]', :now, :error, :batch, :started, :finished)"
                ),
                {
                    "id": execution_id,
                    "status": status,
                    "h": "a" * 64,
                    "now": now,
                    "error": error,
                    "batch": batch_id,
                    "started": started,
                    "finished": finished,
                },
            )
    command.upgrade(config, "0011")
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT id, log_stored FROM executions")).all())
    assert {k for k, v in stored.items() if v} == {"ran", "failed", "queued-cancel"}
    command.downgrade(config, "0008")
    command.upgrade(config, "head")
    assert _diff(empty_database) == []
    engine.dispose()
