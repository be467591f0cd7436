"""Test fixtures. Integration and end-to-end tests use the real services `make setup` starts:
a fresh PostgreSQL database per session (migrated with Alembic, so every run exercises the
migrations), Redis database 1, a fresh bucket on the S3 endpoint, and the local Docker engine.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _dev_env() -> dict[str, str]:
    values = {}
    for line in (REPO / "scripts" / "dev.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


DEV_ENV = _dev_env()
# Set before anything imports celeryconfig: the tests' broker is Redis database 1, so a stack
# started with `make up` (database 0) never sees the tests' tasks.
for _key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RGRID_S3_ENDPOINT_URL"):
    os.environ.setdefault(_key, DEV_ENV[_key])
os.environ["RGRID_REDIS_URL"] = os.environ.get("RGRID_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
# A queue of this session's own: two test runs at once (two checkouts) never take each
# other's tasks.
os.environ["RGRID_QUEUE"] = f"rgrid-test-{secrets.token_hex(4)}"
os.environ.pop("RGRID_API_URL", None)
os.environ.pop("RGRID_API_KEY", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own for this test session, built by the migrations."""
    from sqlalchemy import create_engine, text

    from rgrid.db import get_engine, upgrade

    base = DEV_ENV["RGRID_DATABASE_URL"]
    name = f"rgrid_test_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    os.environ["RGRID_DATABASE_URL"] = url
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def bucket() -> str:
    name = f"rgrid-test-{secrets.token_hex(4)}"
    os.environ["RGRID_S3_BUCKET"] = name
    return name


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis database 1, shared: every key the tests write is per execution or per queue, so
    nothing is flushed (another test run may be using it)."""
    return os.environ["RGRID_REDIS_URL"]


@pytest.fixture(scope="session")
def server_settings(database_url, bucket, redis_url, tmp_path_factory):
    from rgrid.config import Settings

    return replace(
        Settings.from_env(),
        database_url=database_url,
        redis_url=redis_url,
        s3_endpoint_url=DEV_ENV["RGRID_S3_ENDPOINT_URL"],
        s3_bucket=bucket,
        data_dir=tmp_path_factory.mktemp("server-data"),
        default_timeout_s=120,
        # The tests serve wheels they make from a local folder (tests/wheels.py).
        allow_local_find_links=True,
    )


@pytest.fixture(scope="session")
def ctx(server_settings):
    """The pipeline's surroundings on the real services, as a worker has them."""
    from rgrid.context import server_context

    return server_context(server_settings)


@pytest.fixture
def account(ctx):
    """A fresh account per test, so cache rows never leak between tests. Its id is random:
    images are named from account ids, and Docker keeps images between test sessions whose
    databases would otherwise hand out the same ids again."""
    from rgrid.db import session_scope
    from rgrid.models import Account

    with session_scope(ctx.session_factory) as session:
        row = Account(
            id=10**6 + secrets.randbelow(2**31 - 10**6), name=f"acct-{secrets.token_hex(4)}"
        )
        session.add(row)
        session.flush()
        return row


@pytest.fixture
def run_script(ctx, account):
    """Submit a script as ``account`` and run the whole pipeline; returns the execution dict."""
    from rgrid import executions as svc
    from rgrid.db import session_scope
    from rgrid.pipeline import run_all

    def _run(
        script: str,
        *,
        timeout_s: int | None = None,
        args: list[str] | None = None,
        account_id: int | None = None,
        requirements: str | None = None,
        refresh_deps: bool = False,
    ) -> dict:
        with session_scope(ctx.session_factory) as session:
            execution = svc.create_execution(
                session,
                ctx.store,
                ctx.settings,
                account_id=account_id or account.id,
                requirements=requirements,
                refresh_deps=refresh_deps,
                script=script,
                script_name="job.py",
                timeout_s=timeout_s,
                args=args,
            )
            execution_id = execution.id
        run_all(ctx, execution_id)
        with session_scope(ctx.session_factory) as session:
            return svc.execution_to_dict(session.get(svc.Execution, execution_id))

    return _run
