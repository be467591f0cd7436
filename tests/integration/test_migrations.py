"""The models and the migrations never disagree."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from rgrid.db import upgrade
from rgrid.models import Base


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
