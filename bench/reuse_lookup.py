"""Output-cache lookups on a miss at a million entries (issue 23's target: <= 1 ms p99
added to a submission): what `--reuse` adds to a submission that misses (the action key's
computation and its indexed lookup, as ``reuse.at_submission`` runs them in the submission's
transaction), the whole ``at_submission`` with and without `--reuse`, and a batch page's
bulk lookup of 1,000 keys in one query (``reuse.lookup_many``), against the floor of a bare
indexed SELECT with psycopg2 on the same database.

Run: `.venv/bin/python bench/reuse_lookup.py [--rows 1000000] [--lookups 5000]`. It makes a
scratch PostgreSQL database of its own (dropped at the end), seeds the entries in bulk into
one throwaway account with generate_series, and prints p50/p99 per row. Nothing passes or
fails."""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import interleaved_ms, p50_p99, report_ms, seed_table  # noqa: E402 - the shared harness
from scripts.devenv import fresh_database  # noqa: E402 - the one way to make a database

ACCOUNT = 1


def seed(url: str, rows: int) -> float:
    """``rows`` output-cache entries of one account, in bulk: the seconds it took."""
    entries = (
        "INSERT INTO output_cache (account_id, action_key, execution_id, outputs,"
        " exit_code, run_s, bytes, created_at, last_used_at, use_count) "
        "SELECT :account, md5(g::text) || md5((-g)::text), 'bench' || g, '[]'::json,"
        " 0, 1.0, 0, now(), now(), 0 FROM generate_series(1, :rows) g"
    )
    account = "INSERT INTO accounts (id, name, created_at) VALUES (:id, 'bench', now())"
    return seed_table(
        url,
        "output_cache",
        [(account, {"id": ACCOUNT}), (entries, {"account": ACCOUNT, "rows": rows})],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5000)
    args = parser.parse_args()

    from rgrid.core.db import get_engine, get_session_factory, upgrade

    with fresh_database("rgrid_bench") as url:
        upgrade(url)
        print(f"seeded {args.rows} output-cache entries in {seed(url, args.rows):.1f} s")
        factory = get_session_factory(url)
        rng = random.Random(20261203)
        keys = [rng.randint(1, 10**12) for _ in range(args.lookups)]
        step = factory()  # the submission's transaction, as the API runs the lookup in it
        dsn = url.replace("postgresql+psycopg2://", "postgresql://")
        print(f"misses at {args.rows} entries ({args.lookups} lookups each):")
        miss_rows(step, dsn, keys)
        page_row(step)
        step.close()
        get_engine(url).dispose()


def execution(g: int) -> SimpleNamespace:
    """A new run that misses: its inputs were never seen (a fresh input hash)."""
    return SimpleNamespace(
        account_id=ACCOUNT,
        runtime="python:3.11",
        runtime_image="sha256:bench",
        dependency_hash=None,
        requirements=None,
        refresh_deps=False,
        source_digest=hashlib.sha256(b"job.py").hexdigest(),
        script_hash=hashlib.sha256(b"job.py").hexdigest(),
        input_hash=hashlib.sha256(f"miss {g}".encode()).hexdigest(),
        args=["data.csv"],
        script_name="job.py",
    )


def miss_rows(step, dsn: str, keys: list[int]) -> None:
    """A single run's miss in the submission's transaction ``step``: what ``--reuse`` adds
    (key + lookup) against a bare indexed SELECT, and ``at_submission`` with and without it."""
    import psycopg2

    from rgrid.core.config import Settings
    from rgrid.pipeline import reuse

    settings = Settings.from_env()

    def key_and_lookup(g: int) -> None:
        run = execution(g)
        parts = reuse.key_parts(settings, run, runtime_image="sha256:bench", resolution="", env={})
        key = reuse.key_of(settings, ACCOUNT, parts)
        assert reuse.lookup(step, ACCOUNT, key) is None

    reader = psycopg2.connect(dsn)
    reader.autocommit = True
    cursor = reader.cursor()

    def bare_select(g: int) -> None:
        key = hashlib.sha256(f"bare {g}".encode()).hexdigest()
        cursor.execute(
            "SELECT id FROM output_cache WHERE account_id = %s AND action_key = %s",
            (ACCOUNT, key),
        )
        assert cursor.fetchone() is None

    floor, added, with_reuse, without = interleaved_ms(
        [
            bare_select,
            key_and_lookup,
            submission_miss(step, settings, True),
            submission_miss(step, settings, False),
        ],
        keys,
    )
    step.rollback()
    report_ms("floor: bare indexed SELECT, autocommit", floor)
    report_ms("rgrid: what --reuse adds (key + lookup)", added, floor)
    report_ms("rgrid: at_submission with --reuse", with_reuse)
    report_ms("rgrid: at_submission without --reuse", without)
    (w50, w99), (o50, o99) = p50_p99(with_reuse), p50_p99(without)
    print(f"  difference with - without: p50 {w50 - o50:+.3f} ms, p99 {w99 - o99:+.3f} ms")
    reader.close()


def submission_miss(step, settings, reuse_it: bool) -> Callable[[int], None]:
    """``reuse.at_submission`` of run ``g`` (a miss) in ``step``, with or without ``--reuse``."""
    from rgrid.core.models import Execution
    from rgrid.pipeline import reuse
    from rgrid.store.objectstore import LocalStore

    store = LocalStore(Path("/nonexistent-bench-store"))  # a miss never reaches it

    def once(g: int) -> None:
        run = Execution(
            **{k: v for k, v in vars(execution(g)).items() if k != "runtime_image"},
            stdin=False,
        )
        answered = reuse.at_submission(
            step,
            store,
            settings,
            run,
            env=None,
            runtime_image="sha256:bench",
            reuse=reuse_it,
        )
        assert not answered

    return once


def page_row(step) -> None:
    """A batch page: 1,000 keys looked up in one query (all misses), 50 pages."""
    from rgrid.pipeline import reuse

    pages = []
    for page in range(50):
        wanted = [hashlib.sha256(f"page {page} {n}".encode()).hexdigest() for n in range(1000)]
        started = time.perf_counter()
        assert reuse.lookup_many(step, ACCOUNT, wanted) == {}
        pages.append((time.perf_counter() - started) * 1000)
    step.rollback()
    pages.sort()
    print(
        f"rgrid: a batch page's bulk lookup, 1,000 keys in one query: p50"
        f" {statistics.median(pages):.2f} ms, p99 {pages[-1]:.2f} ms per page"
        # ms per 1,000 inputs is us per input.
        f" ({statistics.median(pages):.1f} us per input)"
    )


if __name__ == "__main__":
    main()
