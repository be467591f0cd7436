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

from scripts.devenv import dev_env, fresh_database

DEV_ENV = dev_env()

#: A script that prints a numbered line every 0.2 s for two minutes: something to stop.
TICKER = (
    "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.2)\n"
)
# Set before anything imports celeryconfig: the tests' broker is Redis database 1, so a stack
# started with `make up` (database 0) never sees the tests' tasks.
for _key in (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "RGRID_S3_ENDPOINT_URL",
    "RGRID_SECRET_KEY",
):
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
    from rgrid.core.db import get_engine, upgrade

    with fresh_database() as url:
        upgrade(url)
        os.environ["RGRID_DATABASE_URL"] = url
        yield url
        get_engine(url).dispose()


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
    from rgrid.core.config import Settings

    return replace(
        Settings.from_env(),
        database_url=database_url,
        redis_url=redis_url,
        s3_endpoint_url=DEV_ENV["RGRID_S3_ENDPOINT_URL"],
        s3_bucket=bucket,
        data_dir=tmp_path_factory.mktemp("server-data"),
        default_timeout_s=120,
        # The tests serve wheels they make from a local folder (tests/wheels.py) or from an
        # index on loopback (tests/index_server.py).
        allow_local_find_links=True,
        allowed_indexes=("127.0.0.1",),
    )


def stored_log(ctx, execution_id: str, stream: str | None = None) -> str:
    """The text of an execution's stored log: one stream's, or every stream's in order. Chunk
    boundaries are the writes the sandbox happened to see, so tests compare the text."""
    from rgrid.core import cache_keys
    from rgrid.store.logbuffer import decode_log

    chunks = decode_log(ctx.store.get_bytes(cache_keys.log_object_key(execution_id)))
    return "".join(text for s, text in chunks if stream is None or s == stream)


def stored_phases(ctx, execution_id: str) -> list[str]:
    """The phase lines (install steps with their elapsed times) of an execution's stored log."""
    from rgrid.core import cache_keys
    from rgrid.store.logbuffer import decode_log

    chunks = decode_log(ctx.store.get_bytes(cache_keys.log_object_key(execution_id)))
    return [text for s, text in chunks if s == "phase"]


def retire_sandboxes(root: Path) -> int:
    """End the embedded agents and warm sandboxes of one test session (or one embedded user):
    left alone, they would idle on for ``agent_idle_s`` / ``pool_idle_s`` after their folders
    are deleted."""
    import docker

    from rgrid.client.agent_client import stop_agents
    from rgrid.core.config import Settings
    from rgrid.host import pool

    settings = Settings(data_dir=root)
    stop_agents(settings)
    client = docker.from_env()
    ended = pool.retire_installation(client, settings.sandboxes_dir)
    # The folders of sandboxes that idled out still hold their filesystems' mounts.
    pool.sweep_folders(client, settings.sandboxes_dir, min_age_s=0)
    return ended


@pytest.fixture(scope="session")
def ctx(server_settings):
    """The pipeline's surroundings on the real services, as a worker has them."""
    from rgrid.service.context import server_context

    context = server_context(server_settings)
    yield context
    context.join_background()
    retire_sandboxes(server_settings.data_dir)


@pytest.fixture
def account(ctx):
    """A fresh account per test, so cache rows never leak between tests. Its id is random, so
    that what is named from account ids (environment folders, local script copies) never meets
    another test session's on this host."""
    from rgrid.core.db import session_scope
    from rgrid.core.models import Account

    with session_scope(ctx.session_factory) as session:
        row = Account(
            id=10**6 + secrets.randbelow(2**31 - 10**6), name=f"acct-{secrets.token_hex(4)}"
        )
        session.add(row)
        session.flush()
        return row


@pytest.fixture
def submit(ctx, account):
    """Submit a script as ``account`` (or ``account_id``) without running it; returns its id."""
    from rgrid.core.db import session_scope
    from rgrid.service import executions as svc

    def _submit(script: str, *, account_id: int | None = None, **options) -> str:
        with session_scope(ctx.session_factory) as session:
            execution = svc.create_execution(
                session,
                ctx.store,
                ctx.settings,
                account_id=account_id or account.id,
                script=script,
                script_name="job.py",
                **options,
            )
            return execution.id

    return _submit


def _as_dicts(ctx, ids: list[str]) -> list[dict]:
    from rgrid.core.db import session_scope
    from rgrid.service import executions as svc

    with session_scope(ctx.session_factory) as session:
        return [svc.execution_to_dict(session.get(svc.Execution, i)) for i in ids]


@pytest.fixture
def run_script(ctx, submit):
    """Submit a script and run the whole pipeline in this process; returns the execution."""
    from rgrid.pipeline.chain import run_all

    def _run(script: str, **options) -> dict:
        execution_id = submit(script, **options)
        run_all(ctx, execution_id)
        return _as_dicts(ctx, [execution_id])[0]

    return _run


@pytest.fixture
def run_concurrently(ctx):
    """Run the pipelines of several submitted executions at once, one thread each."""
    import threading

    from rgrid.pipeline.chain import run_all

    def _run(ids: list[str], timeout_s: int = 300) -> list[dict]:
        threads = [threading.Thread(target=run_all, args=(ctx, i)) for i in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout_s)
        return _as_dicts(ctx, ids)

    return _run


@pytest.fixture
def embedded_env(tmp_path) -> Iterator[dict[str, str]]:
    """The environment of a user with no server configured: the embedded default."""
    server_only = ("RGRID_API_URL", "RGRID_API_KEY", "RGRID_DATABASE_URL", "RGRID_S3_ENDPOINT_URL")
    env = {k: v for k, v in os.environ.items() if k not in server_only}
    env["RGRID_DATA_DIR"] = str(tmp_path / ".rgrid-data")
    yield env
    retire_sandboxes(tmp_path / ".rgrid-data")
