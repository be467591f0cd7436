"""When the cache tables cannot be read, a run is a miss that builds, never a failure."""

from __future__ import annotations

import re
import secrets

import psycopg2.errors
from prometheus_client import REGISTRY
from sqlalchemy import event

from tests.integration.pipeline.test_pipeline import _log
from tests.wheels import make_wheel

#: A statement that reads or writes a cache table (not the executions' cache-hit columns).
CACHE_TABLE = re.compile(r"\b(FROM|INTO|UPDATE|JOIN)\s+(script_cache|dependency_cache)\b")


def _misses(cache: str) -> float:
    return REGISTRY.get_sample_value("rgrid_cache_misses_total", {"cache": cache}) or 0.0


def _system_notes(ctx, execution_id: str) -> list[str]:
    return [text for stream, text in _log(ctx, execution_id) if stream == "system"]


def test_a_database_error_in_the_cache_lookup_is_a_miss_that_builds(ctx, run_script, tmp_path):
    dist = f"fallback-dep-{secrets.token_hex(3)}"
    make_wheel(tmp_path, dist, "1.0")
    requirements = f"--find-links {tmp_path}\n{dist}\n"
    script = f"import {dist.replace('-', '_')} as m\nprint('version', m.VERSION)\n"
    first = run_script(script, requirements=requirements)
    assert first["status"] == "succeeded", first["error"]

    # Every query of the cache tables now fails as a revoked permission would.
    engine = ctx.session_factory.kw["bind"]

    def deny(_conn, _cursor, statement, *_args) -> None:
        if CACHE_TABLE.search(statement):
            raise psycopg2.errors.InsufficientPrivilege("permission denied for table (test)")

    misses = {cache: _misses(cache) for cache in ("script", "dependency")}
    event.listen(engine, "before_cursor_execute", deny)
    try:
        second = run_script(script, requirements=requirements)
    finally:
        event.remove(engine, "before_cursor_execute", deny)

    assert second["status"] == "succeeded", second["error"]
    assert (second["script_cache_hit"], second["dependency_cache_hit"]) == (False, False)
    notes = _system_notes(ctx, second["execution_id"])
    assert any(n.startswith("cache unavailable (permission denied") for n in notes), notes
    assert any(n.startswith("installed 1 package(s)") for n in notes), notes  # it built
    assert _misses("script") - misses["script"] == 1
    assert _misses("dependency") - misses["dependency"] == 1
