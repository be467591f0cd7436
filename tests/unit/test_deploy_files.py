"""The sample Prometheus and Grafana files name only metrics RGrid exports."""

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from rgrid import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Computed at scrape by the collectors in rgrid/metrics.py.
COLLECTED = {
    "rgrid_cache_entries",
    "rgrid_cache_bytes",
    "rgrid_cache_oldest_unused_seconds",
    "rgrid_host_cache_entries",
    "rgrid_host_cache_bytes",
    "rgrid_pool_warm_sandboxes",
}


def exported() -> set[str]:
    assert metrics.CACHE_HITS is not None  # defines (registers) every metric
    names = set(COLLECTED)
    for family in REGISTRY.collect():
        # Labelled metrics have no samples until a label is used: name their series here.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_the_dashboard_names_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\brgrid_\w+", expr)}
    assert used and used <= exported(), used - exported()


def test_the_scrape_config_names_both_exporters():
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "job_name: rgrid-api" in text and "job_name: rgrid-workers" in text
