"""`rgrid admin migrate` from many hosts at once, and `rgrid admin check`'s one line per
service, against the real PostgreSQL, Redis, S3 endpoint and Docker engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.devenv import fresh_database

RGRID = str(Path(sys.executable).parent / "rgrid")


def _env(**values: str) -> dict[str, str]:
    return {**os.environ, **values}


def test_four_hosts_migrating_a_new_database_at_once_migrate_it_once(tmp_path):
    from rgrid.core.db import newest_revision, schema_revision

    with fresh_database("rgrid_migrate") as url:
        running = [
            subprocess.Popen(
                [RGRID, "admin", "migrate"],
                env=_env(RGRID_DATABASE_URL=url),
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        results = [(p.communicate(timeout=180), p.returncode) for p in running]
        assert schema_revision(url) == newest_revision()
    assert [code for _, code in results] == [0] * 4, results
    outs = sorted(out for (out, _), _ in results)
    head = newest_revision()
    count = len(list((Path(__file__).parents[3] / "migrations" / "versions").glob("0*.py")))
    assert outs == [f"database is up to date (schema {head})\n"] * 3 + [
        f"database migrated to {head} ({count} migration(s) applied)\n"
    ], outs


def test_check_says_in_one_line_each_what_is_wrong(server_settings, tmp_path):
    env = _env(
        RGRID_DATABASE_URL=server_settings.database_url,
        RGRID_REDIS_URL="redis://127.0.0.1:1/0",  # nothing listens there
        RGRID_S3_ENDPOINT_URL=server_settings.s3_endpoint_url,
        RGRID_S3_BUCKET="rgrid-no-such-bucket-here",
        DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock",
    )
    env.pop("RGRID_API_URL", None)
    result = subprocess.run(
        [RGRID, "admin", "check"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 125
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "database"],
        ["FAIL", "broker"],
        ["FAIL", "store"],
        ["FAIL", "docker"],
    ], lines
    assert "127.0.0.1:1" in lines[1] and "no such bucket" in lines[2]
    assert "Docker engine unreachable" in lines[3]
    assert result.stderr == "rgrid: error: 3 check(s) failed: broker, store, docker\n"
    assert "Traceback" not in result.stdout + result.stderr


def test_check_names_a_schema_that_needs_migrating(tmp_path):
    with fresh_database("rgrid_check") as url:
        result = subprocess.run(
            [RGRID, "admin", "check", "--role", "beat"],
            env=_env(RGRID_DATABASE_URL=url),
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
    assert result.returncode == 125
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAIL database") and "run `rgrid admin migrate`" in first, first
