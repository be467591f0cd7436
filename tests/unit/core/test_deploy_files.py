"""The sample Prometheus and Grafana files name only metrics RGrid exports."""

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from rgrid.core import metrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
#: Computed at scrape by the collectors in rgrid/core/metrics.py.
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


# --- deploy/rgrid.env against rgrid/core/config.py ------------------------------------------------

ROLES = {"api", "worker", "beat", "flower", "cli", "required"}
#: Read by the libraries themselves (boto3, docker-py) or by the units, not by Settings.
NOT_SETTINGS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DOCKER_HOST"}


def template() -> dict[str, tuple[str, bool, set[str]]]:
    """Each variable of the template: (value, commented out, roles of its note)."""
    found, roles = {}, set()
    for line in (DEPLOY / "rgrid.env").read_text().splitlines():
        note = re.match(r"# \[([a-z ]+)\]( required)?", line)
        if note:
            roles = set(note.group(1).split()) | ({"required"} if note.group(2) else set())
            continue
        setting = re.match(r"(#?)([A-Z][A-Z0-9_]+)=(.*)$", line)
        if setting:
            found[setting.group(2)] = (setting.group(3), bool(setting.group(1)), roles)
    return found


def config_variables() -> set[str]:
    source = (Path(metrics.__file__).parent / "config.py").read_text()
    return set(re.findall(r'"(RGRID_[A-Z0-9_]+)"', source))


def field_of(variable: str) -> str | None:
    """The Settings field ``variable`` sets (None: a derived folder, read by a property)."""
    import dataclasses
    import os
    from unittest import mock

    from rgrid.core.config import Settings

    base = Settings.from_env()
    for probe in ("7", "1", "0", "x"):
        with mock.patch.dict(os.environ, {variable: probe}):
            try:
                changed = Settings.from_env()
            except ValueError:
                continue
        for f in dataclasses.fields(Settings):
            if getattr(changed, f.name) != getattr(base, f.name):
                return f.name
    return None


def test_the_env_template_names_every_setting_once_with_its_roles():
    found = template()
    variables = set(found) - NOT_SETTINGS
    assert variables == config_variables(), variables ^ config_variables()
    for name, (_, _, roles) in found.items():
        assert roles and roles <= ROLES, (name, roles)


def test_the_env_template_shows_each_default_as_config_py_has_it():
    import dataclasses

    from rgrid.core.config import Settings

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(Settings)
        if f.default is not dataclasses.MISSING
    }
    for name, (value, commented, roles) in template().items():
        if name in NOT_SETTINGS:
            continue
        if not commented:  # a value an operator must give: not a default to check
            assert "required" in roles or name == "RGRID_DATA_DIR", name
            continue
        field = field_of(name)
        default = defaults.get(field) if field else None
        if value == "":
            # Unset means derived (a folder under the data dir, the hostname), none or empty.
            assert default in (None, (), "") or field in (None, "host_name"), (name, default)
        elif isinstance(default, bool):
            assert value == ("1" if default else "0"), (name, value, default)
        elif isinstance(default, (int, float)):
            assert type(default)(value) == default, (name, value, default)
        else:
            assert value == default, (name, value, default)
