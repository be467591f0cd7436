"""Metrics as an operator's Prometheus reads them: the API under gunicorn with two worker
processes and a Celery worker host with its exporter, scraped over HTTP after real runs."""

from __future__ import annotations

import os
import secrets
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from scripts.devenv import free_port
from scripts.launcher import Stack, StackConfig, create_account_key
from tests.conftest import retire_sandboxes
from tests.e2e.conftest import run_json
from tests.wheels import make_wheel


@pytest.fixture(scope="module")
def metrics_stack(server_settings, tmp_path_factory) -> Iterator[tuple[StackConfig, dict]]:
    data_dir = tmp_path_factory.mktemp("metrics-data")
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(data_dir),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        # A queue of its own: the integration tests' in-process pipelines share the session's.
        "RGRID_QUEUE": f"rgrid-metrics-{secrets.token_hex(4)}",
        "RGRID_ALLOW_LOCAL_FIND_LINKS": "1",
    }
    port = free_port()
    config = StackConfig(
        env=env,
        log_dir=tmp_path_factory.mktemp("metrics-logs"),
        name=f"metrics-{port}",
        api_port=port,
        roles=("api", "worker"),
        supervised=False,
    )
    try:
        with Stack(config):
            cli_env = {
                **env,
                "RGRID_API_URL": config.api_url,
                "RGRID_API_KEY": create_account_key(env, f"metrics-{port}"),
            }
            yield config, cli_env
    finally:
        retire_sandboxes(data_dir)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counting_processes(folder: Path) -> set[str]:
    """The processes whose own metric file counted a submission."""
    counting = set()
    for path in folder.glob("counter_*.db"):
        for metric in MultiProcessCollector._read_metrics([str(path)]).values():
            if any(
                s.name == "rgrid_executions_submitted_total" and s.value > 0 for s in metric.samples
            ):
                counting.add(path.name)
    return counting


def wait_for(url: str, done, timeout_s: float = 30) -> dict:
    """The execution's numbers are counted just after its status is published: scrape until
    they are in."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_cache_hits_and_misses_are_counted_per_cache_type(metrics_stack, tmp_path):
    config, env = metrics_stack
    dist = f"metrics-dep-{secrets.token_hex(3)}"
    make_wheel(tmp_path, dist, "1.0")
    (tmp_path / "requirements.txt").write_text(f"--find-links {tmp_path}\n{dist}\n")
    (tmp_path / "job.py").write_text("import sys\nprint(open(sys.argv[1]).read())\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")  # 8 bytes
    args = ("run", "job.py", "data.csv", "-r", "requirements.txt")

    first, result = run_json(*args, env=env, cwd=tmp_path)
    assert first["status"] == "succeeded", result.stderr
    second, result = run_json(*args, env=env, cwd=tmp_path)
    assert second["status"] == "succeeded", result.stderr
    assert (second["script_cache_hit"], second["dependency_cache_hit"]) == (True, True)

    url = config.worker_metrics_url
    samples = wait_for(
        url, lambda s: value(s, "rgrid_execution_seconds_count", status="succeeded") >= 2
    )
    for cache in ("script", "dependency", "input"):
        assert value(samples, "rgrid_cache_hits_total", cache=cache) == 1, cache
        assert value(samples, "rgrid_cache_misses_total", cache=cache) == 1, cache
    assert value(samples, "rgrid_execution_seconds_count", status="succeeded") == 2
    assert value(samples, "rgrid_execution_queue_wait_seconds_count", status="succeeded") == 2
    assert value(samples, "rgrid_execution_run_seconds_count", status="succeeded") == 2
    assert value(samples, "rgrid_input_bytes_uploaded_total") == 8
    assert value(samples, "rgrid_input_bytes_saved_total") == 8
    assert value(samples, "rgrid_environment_build_seconds_count") == 1
    assert value(samples, "rgrid_environment_install_seconds_count") == 1
    assert (
        value(samples, "rgrid_pool_claims_total") + value(samples, "rgrid_pool_misses_total") == 2
    )
    # This host's disk, measured at scrape: the one environment, the script and the input.
    assert value(samples, "rgrid_host_cache_entries", kind="environment") == 1
    assert value(samples, "rgrid_host_cache_entries", kind="blob") >= 1
    assert value(samples, "rgrid_host_cache_bytes", kind="environment") > 0


def test_api_metrics_add_up_across_its_gunicorn_processes(metrics_stack, tmp_path):
    """Two gunicorn worker processes each count the submissions they take; every scrape,
    whichever process answers it, reports the sum."""
    config, env = metrics_stack
    url = f"{config.api_url}/metrics"
    before = value(scrape(url), "rgrid_executions_submitted_total")
    (tmp_path / "quick.py").write_text("print('ok')\n")
    runs = 12

    def submit(_) -> str:
        done, result = run_json("run", "quick.py", "--detach", env=env, cwd=tmp_path)
        return done["execution_id"]

    # At once, so that both processes (4 threads each) take some.
    with ThreadPoolExecutor(runs) as pool:
        assert all(pool.map(submit, range(runs)))
    assert len(counting_processes(Path(config.log_dir, "metrics-api"))) >= 2
    for _ in range(10):
        samples = scrape(url)
        assert value(samples, "rgrid_executions_submitted_total") - before == runs
        # The cache gauges come from the database: the same in every answer.
        assert value(samples, "rgrid_cache_entries", cache="script") >= 0
        assert ("rgrid_cache_entries", (("cache", "input"),)) in samples
