"""`rgrid cache stats|ls|purge` through the real CLI: against the running stack (the account's
own entries through the API) and embedded (this machine's cache)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json


@pytest.fixture(params=["stack", "embedded"])
def cli_env(request):
    return request.getfixturevalue("stack_env" if request.param == "stack" else "embedded_env")


def test_stats_ls_and_purge_show_and_clean_the_account_cache(cli_env, tmp_path):
    env = dict(cli_env)
    if "RGRID_API_URL" in cli_env:
        # A fresh account: its numbers are its own, whatever other tests ran.
        from scripts.launcher import create_account_key

        env["RGRID_API_KEY"] = create_account_key(cli_env, f"cache-{tmp_path.name[-12:]}")
    (tmp_path / "job.py").write_text("import sys\nprint(open(sys.argv[1]).read())\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")  # 8 bytes
    for _ in range(2):
        done, result = run_json("run", "job.py", "data.csv", env=env, cwd=tmp_path)
        assert done["status"] == "succeeded", result.stderr

    stats, _ = run_json("cache", "stats", env=env, cwd=tmp_path)
    day = stats["hit_rates"]["1d"]
    assert day["script"] == {"hits": 1, "lookups": 2, "hit_rate": 0.5}
    assert day["input"] == {"hits": 1, "lookups": 2, "hit_rate": 0.5}
    assert day["dependency"]["lookups"] == 0
    assert stats["caches"]["script"]["entries"] == 1
    assert stats["caches"]["input"]["entries"] == 1
    assert stats["caches"]["input"]["bytes"] == 8
    assert stats["caches"]["script"]["oldest_used_at"]

    human = run_cli("cache", "stats", env=env, cwd=tmp_path)
    assert human.returncode == 0, human.stderr
    assert "50% (1/2)" in human.stdout and "last purge:" in human.stdout

    listed, _ = run_json("cache", "ls", env=env, cwd=tmp_path)
    # Every succeeded run records its action key (the output cache), --reuse or not.
    assert sorted(e["cache"] for e in listed) == ["input", "outputs", "script"]
    assert "input" in run_cli("cache", "ls", env=env, cwd=tmp_path).stdout

    kept, _ = run_json("cache", "purge", "--older-than", "7d", env=env, cwd=tmp_path)
    assert kept["removed"]["script_cache"] == 0 and kept["removed"]["blobs"] == 0
    purged, _ = run_json("cache", "purge", "--all", env=env, cwd=tmp_path)
    assert purged["removed"]["script_cache"] == 1
    assert purged["removed"]["blobs"] == 1 and purged["removed"]["blob_bytes"] == 8

    after, _ = run_json("cache", "stats", env=env, cwd=tmp_path)
    assert after["caches"]["script"]["entries"] == 0
    assert after["caches"]["input"]["entries"] == 0
    assert after["caches"]["outputs"]["entries"] == 0
    # A purged entry is a miss next time: the script and its input are sent again.
    again, result = run_json("run", "job.py", "data.csv", env=env, cwd=tmp_path)
    assert again["status"] == "succeeded", result.stderr
    assert again["script_cache_hit"] is False and again["files_uploaded"] == 1


def test_purge_needs_an_age_or_all(cli_env, tmp_path):
    assert_one_line_error(
        run_cli("cache", "purge", env=cli_env, cwd=tmp_path), "--older-than AGE or --all"
    )
    bad = run_cli("cache", "purge", "--older-than", "soon", env=cli_env, cwd=tmp_path)
    assert bad.returncode == 125
    assert_one_line_error(bad, "must look like 7d")
