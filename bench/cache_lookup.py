"""Script-cache lookups at a million rows: RGrid's own lookup (the pipeline's query, in a
session with its savepoint, as the cache-lookup step runs it) and its touch (the store step's
`caches.remember_script` and commit), against the floor of a bare indexed SELECT (and SELECT +
UPDATE + COMMIT) with psycopg2 on the same database. Then the nightly purge of a million
stale rows.

Run: `.venv/bin/python bench/cache_lookup.py [--rows 1000000] [--lookups 5000]`. It makes a
scratch PostgreSQL database of its own (dropped at the end), seeds it in bulk with
generate_series, and prints p50/p99 per row. Nothing passes or fails; the target is p99 <= 1 ms
for the lookup."""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import interleaved_ms, report_ms, seed_table  # noqa: E402 - the shared harness
from scripts.devenv import fresh_database  # noqa: E402 - the one way to make a database

ACCOUNTS = 1000


def _key(g: int) -> tuple[int, str]:
    """Row ``g``'s account and script hash, as the seeding SQL makes them."""
    return 1 + g % ACCOUNTS, hashlib.md5(str(g).encode()).hexdigest() + hashlib.md5(
        str(-g).encode()
    ).hexdigest()


def seed(url: str, rows: int) -> float:
    """``rows`` script-cache rows over ACCOUNTS accounts, in bulk: the seconds it took."""
    from rgrid.core.cache_keys import EMPTY_DEPENDENCY_HASH

    accounts = (
        "INSERT INTO accounts (id, name, created_at) "
        "SELECT g, 'bench-' || g, now() FROM generate_series(1, :n) g"
    )
    entries = (
        "INSERT INTO script_cache (account_id, runtime, dependency_hash, script_hash,"
        " environment, runtime_image, created_at, last_used_at, use_count) "
        "SELECT 1 + g % :accounts, 'python:3.11', :deps,"
        " md5(g::text) || md5((-g)::text), NULL, 'sha256:bench', now(), now(), 1 "
        "FROM generate_series(1, :rows) g"
    )
    return seed_table(
        url,
        "script_cache",
        [
            (accounts, {"n": ACCOUNTS}),
            (entries, {"accounts": ACCOUNTS, "deps": EMPTY_DEPENDENCY_HASH, "rows": rows}),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5000)
    args = parser.parse_args()

    from rgrid.core.db import get_engine, get_session_factory, upgrade

    with fresh_database("rgrid_bench") as url:
        upgrade(url)
        print(f"seeded {args.rows} script-cache rows in {seed(url, args.rows):.1f} s")
        rng = random.Random(20261122)
        keys = [rng.randint(1, args.rows) for _ in range(args.lookups)]
        factory = get_session_factory(url)
        dsn = url.replace("postgresql+psycopg2://", "postgresql://")
        lookup_rows(factory, dsn, keys)
        touch_rows(factory, dsn, keys)
        purge_row(factory)
        get_engine(url).dispose()


def execution(g: int) -> SimpleNamespace:
    """Row ``g`` as the pipeline's steps see its execution."""
    from rgrid.core.cache_keys import EMPTY_DEPENDENCY_HASH

    account, digest = _key(g)
    return SimpleNamespace(
        account_id=account,
        runtime="python:3.11",
        dependency_hash=EMPTY_DEPENDENCY_HASH,
        script_hash=digest,
        source_digest=None,  # a single-file script: its tree key is its script hash
        environment=None,
        runtime_image="sha256:bench",
    )


#: The script-cache lookup, as the pipeline and the floors run it.
QUERY = (
    "SELECT environment FROM script_cache WHERE account_id = %s AND runtime = %s"
    " AND dependency_hash = %s AND script_hash = %s"
)


def lookup_rows(factory, dsn: str, keys: list[int]) -> None:
    """RGrid's lookup in the step's transaction and in one of its own, against a bare indexed
    SELECT: one round trip, as the step's lookup is (it runs inside the step's transaction)."""
    import psycopg2

    from rgrid.core.cache_keys import EMPTY_DEPENDENCY_HASH
    from rgrid.core.db import session_scope
    from rgrid.pipeline.caches import script_cache_environment

    step_session = factory()

    def rgrid_lookup(g: int) -> None:
        # What the cache-lookup step adds to its transaction (pipeline.cache_reads: no
        # savepoint, a failure rolls back a transaction that changed nothing yet).
        assert script_cache_environment(step_session, execution(g)) is not None

    def rgrid_lookup_alone(g: int) -> None:
        # The same in a transaction of its own: pool checkout (with its pre-ping), BEGIN,
        # query, commit.
        with session_scope(factory) as session:
            assert script_cache_environment(session, execution(g)) is not None

    reader = psycopg2.connect(dsn)
    reader.autocommit = True
    read_cursor = reader.cursor()

    def bare_select(g: int) -> None:
        account, digest = _key(g)
        read_cursor.execute(QUERY, (account, "python:3.11", EMPTY_DEPENDENCY_HASH, digest))
        assert read_cursor.fetchone() is not None

    floor_select, in_step, alone = interleaved_ms(
        [bare_select, rgrid_lookup, rgrid_lookup_alone], keys
    )
    step_session.commit()
    step_session.close()
    report_ms("floor: bare indexed SELECT, autocommit", floor_select)
    report_ms("rgrid: lookup in the step's transaction", in_step, floor_select)
    report_ms("rgrid: lookup in its own transaction", alone, floor_select)
    reader.close()


def touch_rows(factory, dsn: str, keys: list[int]) -> None:
    """RGrid's touch (the store step's ``caches.remember_script`` and commit) against SELECT +
    UPDATE + COMMIT with psycopg2: a transaction of its own, as the store's."""
    import psycopg2

    from rgrid.core.cache_keys import EMPTY_DEPENDENCY_HASH
    from rgrid.core.db import session_scope
    from rgrid.pipeline.caches import remember_script

    def rgrid_touch(g: int) -> None:
        with session_scope(factory) as session:
            remember_script(session, execution(g))

    conn = psycopg2.connect(dsn)
    cursor = conn.cursor()

    def bare_touch(g: int) -> None:
        account, digest = _key(g)
        key = (account, "python:3.11", EMPTY_DEPENDENCY_HASH, digest)
        cursor.execute(QUERY, key)
        assert cursor.fetchone() is not None
        cursor.execute(
            "UPDATE script_cache SET last_used_at = now(), use_count = use_count + 1"
            " WHERE account_id = %s AND runtime = %s AND dependency_hash = %s"
            " AND script_hash = %s",
            key,
        )
        conn.commit()

    floor_touch, touch = interleaved_ms([bare_touch, rgrid_touch], keys)
    report_ms("floor: SELECT + UPDATE + COMMIT (psycopg2)", floor_touch)
    report_ms("rgrid: touch (caches.remember_script)", touch, floor_touch)
    conn.close()


def purge_row(factory) -> None:
    """The nightly purge of the million rows, every one made stale first."""
    from sqlalchemy import func, select

    from rgrid.core.db import session_scope
    from rgrid.core.models import ScriptCache
    from rgrid.service.purge import purge_script_cache

    with session_scope(factory) as session:
        session.execute(
            ScriptCache.__table__.update().values(
                last_used_at=func.now() - func.make_interval(0, 0, 0, 40)
            )
        )
    started = time.monotonic()
    with session_scope(factory) as session:
        purged = purge_script_cache(session)
    took = time.monotonic() - started
    with session_scope(factory) as session:
        left = session.scalar(select(func.count(ScriptCache.id)))
    print(f"purge of {purged} stale rows: {took:.1f} s ({left} rows left)")


if __name__ == "__main__":
    main()
