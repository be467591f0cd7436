"""Every Prometheus metric RGrid exports, defined once, and the registries that serve them.

Where the numbers come from:

- Counters and histograms are written where things happen: an execution's cache results,
  durations and bytes once, when it ends (``execution_finished``, on the worker that ran it);
  builds, pool claims, evictions and purges where they are done.
- Entry counts and sizes are not kept in process memory at all: a collector reads them from
  the database (the API's /metrics) or from this host's disk (a worker host's exporter) at
  scrape time, so every scrape agrees whichever process answers it.

Several processes, one set of numbers: gunicorn runs the API in several worker processes
and Celery runs each step in a pool process. prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, one folder per API or worker host, emptied when it starts)
lets every process write its own files and the scrape add them up.

Why an exporter on each worker host rather than the Pushgateway: workers are long-lived, and
the Pushgateway is meant for short batch jobs. It would keep a dead host's last numbers
forever, lose Prometheus's ``up`` signal for a host, and need one more service. An exporter
per host is scraped like the API, and also carries the host's own disk gauges (environments,
blob cache, warm pool), which only that host can measure. The worker's main process serves
it (``serve_worker_metrics``) on ``RGRID_WORKER_METRICS_PORT``; its pool processes only write.

Without ``PROMETHEUS_MULTIPROC_DIR`` (the embedded default, a test calling the pipeline in
process) the metrics live in the process's own memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from sqlalchemy.orm import Session, sessionmaker

    from rgrid.core.models import Execution

log = logging.getLogger(__name__)

#: The cache types of the cache contract (docs/design.md), as the ``cache`` label.
CACHE_TYPES = ("script", "dependency", "input", "outputs")

#: Seconds, from a warm run (~0.3 s) to a long job.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)

_DISABLED = False


def disable() -> None:
    """No metrics in this process (the embedded default: nobody scrapes a CLI process, and
    importing prometheus-client would cost every `rgrid run` 40-90 ms)."""
    global _DISABLED
    _DISABLED = True


class _Noop:
    """Stands in for every metric when disabled."""

    def labels(self, *_args, **_kwargs) -> _Noop:
        return self

    def inc(self, *_args) -> None:
        pass

    def observe(self, *_args) -> None:
        pass

    def time(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def _execution_metrics() -> dict[str, object]:
    """Executions: accepted, and how long they waited, ran and took in all."""
    from prometheus_client import Counter, Histogram

    SUBMITTED = Counter("rgrid_executions_submitted_total", "Executions accepted by the API")
    QUEUE_WAIT = Histogram(
        "rgrid_execution_queue_wait_seconds",
        "From submission to the script's start, by final status.",
        ["status"],
        buckets=DURATION_BUCKETS,
    )
    RUN_DURATION = Histogram(
        "rgrid_execution_run_seconds",
        "The script's own run time in its sandbox, by final status.",
        ["status"],
        buckets=DURATION_BUCKETS,
    )
    END_TO_END = Histogram(
        "rgrid_execution_seconds",
        "From submission to the final status, by final status.",
        ["status"],
        buckets=DURATION_BUCKETS,
    )
    return {name: value for name, value in locals().items() if name.isupper()}


def _cache_metrics() -> dict[str, object]:
    """The caches: lookups by cache type, and the bytes and run time they saved."""
    from prometheus_client import Counter

    CACHE_HITS = Counter(
        "rgrid_cache_hits_total",
        "Cache lookups that found a usable entry, by cache type (input: per file).",
        ["cache"],
    )
    CACHE_MISSES = Counter(
        "rgrid_cache_misses_total",
        "Cache lookups that found nothing usable, by cache type (input: per file).",
        ["cache"],
    )
    BYTES_UPLOADED = Counter(
        "rgrid_input_bytes_uploaded_total", "Input bytes clients uploaded for executions."
    )
    BYTES_SAVED = Counter(
        "rgrid_input_bytes_saved_total",
        "Input bytes clients did not upload because the account had them stored (input hits).",
    )
    OUTPUTS_BYTES_SAVED = Counter(
        "rgrid_outputs_bytes_saved_total",
        "Output bytes handed to reused executions without running their script again.",
    )
    OUTPUTS_SECONDS_SAVED = Counter(
        "rgrid_outputs_run_seconds_saved_total",
        "Script run time reused executions did not spend (the original run's time).",
    )
    for cache in CACHE_TYPES:  # every series exists from the start: a ratio is never empty
        CACHE_HITS.labels(cache)
        CACHE_MISSES.labels(cache)
    return {name: value for name, value in locals().items() if name.isupper()}


def _host_metrics() -> dict[str, object]:
    """A worker host's environments and warm sandboxes."""
    from prometheus_client import Counter, Histogram

    ENVIRONMENT_BUILD = Histogram(
        "rgrid_environment_build_seconds",
        "Providing a dependency set on a host that lacks it: waiting for the build lock, "
        "resolving and installing.",
        buckets=DURATION_BUCKETS,
    )
    ENVIRONMENT_INSTALL = Histogram(
        "rgrid_environment_install_seconds",
        "The installer's own time for a dependency set (uv).",
        buckets=DURATION_BUCKETS,
    )
    POOL_CLAIMS = Counter(
        "rgrid_pool_claims_total", "Runs that found a pre-started (warm) sandbox."
    )
    POOL_MISSES = Counter(
        "rgrid_pool_misses_total", "Runs that had to start a sandbox (no warm one was free)."
    )
    return {name: value for name, value in locals().items() if name.isupper()}


def _removal_metrics() -> dict[str, object]:
    """What the purge and the hosts' disk budgets removed."""
    from prometheus_client import Counter

    PURGED = Counter("rgrid_purged_total", "Entries removed by the purge, by kind.", ["kind"])
    PURGED_BYTES = Counter(
        "rgrid_purged_bytes_total", "Bytes freed by the purge, by kind.", ["kind"]
    )
    EVICTED = Counter(
        "rgrid_evicted_total",
        "Entries a host evicted to keep its disk budget, by kind (least recently used first).",
        ["kind"],
    )
    EVICTED_BYTES = Counter(
        "rgrid_evicted_bytes_total",
        "Bytes a host freed to keep its disk budget, by kind.",
        ["kind"],
    )
    return {name: value for name, value in locals().items() if name.isupper()}


@functools.cache
def _defined() -> dict[str, object]:
    """Every metric, created on first use (so a process that never counts never imports
    prometheus-client), each family in a function of its own."""
    defined: dict[str, object] = {}
    for family in (_execution_metrics, _cache_metrics, _host_metrics, _removal_metrics):
        defined.update(family())
    return defined


def __getattr__(name: str):
    """``metrics.CACHE_HITS`` and the others (PEP 562)."""
    if name.isupper() and not name.startswith("_"):
        if _DISABLED:
            return _NOOP
        try:
            return _defined()[name]
        except KeyError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def define() -> None:
    """Create every metric now (the API and the workers, when they start), so every series
    is exported, at zero, before anything has happened."""
    if not _DISABLED:
        _defined()


def _metric(name: str):
    return _NOOP if _DISABLED else _defined()[name]


_NOOP = _Noop()


def _count(cache: str, hit: bool, n: int = 1) -> None:
    if n > 0:
        _metric("CACHE_HITS" if hit else "CACHE_MISSES").labels(cache).inc(n)


def _seconds(start, end) -> float | None:
    if start is None or end is None:
        return None
    if start.tzinfo is None or end.tzinfo is None:  # SQLite drops the zone; both are UTC
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return max(0.0, (end - start).total_seconds())


def execution_finished(execution: Execution) -> None:
    """Count an execution once, as it gets its final status: its cache results (only the
    caches it looked up), its input bytes and its durations. Never raises: a metric must not
    fail a run."""
    try:
        status = str(execution.status)
        if execution.dependency_hash is not None:  # the lookup ran
            _count("script", bool(execution.script_cache_hit))
            if execution.dependency_cache_hit is not None:
                _count("dependency", bool(execution.dependency_cache_hit))
        manifest = execution.inputs or []
        if manifest:
            uploaded = min(execution.files_uploaded or 0, len(manifest))
            _count("input", False, uploaded)
            _count("input", True, len(manifest) - uploaded)
            total = sum(int(item.get("size") or 0) for item in manifest)
            sent = execution.bytes_uploaded or 0
            _metric("BYTES_UPLOADED").inc(sent)
            _metric("BYTES_SAVED").inc(max(0, total - sent))
        for histogram, value in (
            (_metric("QUEUE_WAIT"), _seconds(execution.created_at, execution.started_at)),
            (_metric("RUN_DURATION"), execution.run_s),
            (_metric("END_TO_END"), _seconds(execution.created_at, execution.finished_at)),
        ):
            if value is not None:
                histogram.labels(status).observe(value)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("could not count execution %s", execution.id, exc_info=True)


def output_lookup(hit: bool, run_s: float = 0.0, saved_bytes: int = 0) -> None:
    """One output-cache lookup (rgrid/pipeline/reuse.py); a hit with what it saved."""
    try:
        _count("outputs", hit)
        if hit:
            _metric("OUTPUTS_SECONDS_SAVED").inc(max(0.0, run_s))
            _metric("OUTPUTS_BYTES_SAVED").inc(max(0, saved_bytes))
    except Exception:  # noqa: BLE001 - a metric must not fail a run
        log.warning("could not count an output-cache lookup", exc_info=True)


def count_removed(counter, bytes_counter, kind: str, n: int, size: int) -> None:
    if n:
        counter.labels(kind).inc(n)
    if size:
        bytes_counter.labels(kind).inc(size)


# --- collectors computed at scrape ----------------------------------------------------------


class DatabaseCacheCollector:
    """``rgrid_cache_entries`` and ``rgrid_cache_bytes`` by cache type, and the oldest entry's
    age, from the database at scrape time (the API's /metrics): the same numbers from every
    API process."""

    def __init__(self, session_factory: sessionmaker[Session]):
        self.session_factory = session_factory

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        from rgrid.core import cachestats  # the API's models and queries, only when scraped

        entries = GaugeMetricFamily(
            "rgrid_cache_entries", "Cache entries stored, by cache type.", labels=["cache"]
        )
        size = GaugeMetricFamily(
            "rgrid_cache_bytes",
            "Bytes the stored cache entries account for, by cache type (input: stored blobs).",
            labels=["cache"],
        )
        age = GaugeMetricFamily(
            "rgrid_cache_oldest_unused_seconds",
            "How long the least recently used entry has gone unused, by cache type.",
            labels=["cache"],
        )
        try:
            with self.session_factory() as session:
                rows = cachestats.totals(session, account_id=None)
        except Exception:  # noqa: BLE001 - a scrape must answer while the database is down
            log.warning("cache gauges unavailable", exc_info=True)
            return []
        now = time.time()
        for row in rows:
            entries.add_metric([row.cache], row.entries)
            size.add_metric([row.cache], row.bytes)
            if row.oldest_used is not None:
                age.add_metric([row.cache], max(0.0, now - row.oldest_used.timestamp()))
        return [entries, size, age]


class HostCacheCollector:
    """This worker host's disk: environments and blob-cache entries and bytes, and its warm
    sandboxes. Measured at most every ``every_s`` (walking an environments folder costs)."""

    def __init__(
        self,
        measure: Callable[[], dict[str, tuple[int, int]]],
        pool_size: Callable[[], int],
        every_s: float = 30.0,
    ):
        self.measure, self.pool_size, self.every_s = measure, pool_size, every_s
        self._cached: tuple[float, dict[str, tuple[int, int]], int] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.every_s:
                try:
                    self._cached = (time.monotonic(), self.measure(), self.pool_size())
                except Exception:  # noqa: BLE001 - a scrape must answer anyway
                    log.warning("host cache gauges unavailable", exc_info=True)
                    return []
            _, usage, warm = self._cached
        entries = GaugeMetricFamily(
            "rgrid_host_cache_entries", "Entries kept on this host, by kind.", labels=["kind"]
        )
        size = GaugeMetricFamily(
            "rgrid_host_cache_bytes", "Bytes kept on this host, by kind.", labels=["kind"]
        )
        for kind, (count, nbytes) in usage.items():
            entries.add_metric([kind], count)
            size.add_metric([kind], nbytes)
        pool = GaugeMetricFamily(
            "rgrid_pool_warm_sandboxes", "Pre-started sandboxes waiting on this host."
        )
        pool.add_metric([], warm)
        return [entries, size, pool]


# --- serving ----------------------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """prometheus-client's own variable (it reads it when imported): set by the launcher for
    the API's and each worker host's processes, never by the embedded default."""
    from rgrid.core.config import get_settings

    return get_settings().metrics_multiproc_dir


def registry(*extra) -> CollectorRegistry:
    """What one scrape reports: every process's files in multiprocess mode (else this
    process's own metrics), and ``extra`` collectors computed now."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if multiprocess_dir() is None:
        chosen = CollectorRegistry(auto_describe=False)
        chosen.register(_Forward(REGISTRY))
    else:
        chosen = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(chosen)
    for collector in extra:
        chosen.register(collector)
    return chosen


class _Forward:
    def __init__(self, source: CollectorRegistry):
        self.source = source

    def collect(self):
        return self.source.collect()


def exposition(*extra) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry(*extra))


def fresh_multiprocess_dir(path: Path) -> None:
    """Empty the folder a set of processes will write to (their launcher calls this before
    starting them): files of processes from an earlier start would be counted again."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink(missing_ok=True)


def process_exited(pid: int) -> None:
    """A writer process is gone (a gunicorn worker, a Celery pool process): its live gauges
    are dropped; its counters stay, as the multiprocess mode intends."""
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve_worker_metrics(port: int, host_collector, address: str = "") -> None:
    """A worker host's exporter, in the worker's main process: a daemon thread answering
    /metrics on ``port`` with every pool process's counters and this host's gauges."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=address, registry=registry(host_collector))
    log.info("worker metrics on port %d (pid %d)", port, os.getpid())
