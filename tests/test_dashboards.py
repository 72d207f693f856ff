"""packaging/grafana/fluxrt.json and packaging/prometheus/fluxrt-alerts.yml: every query of the dashboard (its
variables' too) and every alert rule's expression names only metrics that a live node exports, scraped from its
`/metrics` with a database, the cluster engine and TLS on (so that `fluxrt_changefeed_lag_seconds`,
`fluxrt_cluster_*` and `fluxrt_tls_*` are there). The PromQL is read by `metric_names`, a tokenizer that knows
strings, label matchers, ranges, label lists, functions, keywords and Grafana's variables; promtool, where
installed, checks the syntax as well."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from .pg import ROOT
from .support.clients import http_get
from .support.metrics import series_names
from .support.redis import redis_server
from .support.servers import start
from .support.tls import make_ca

DASHBOARD = ROOT / "packaging" / "grafana" / "fluxrt.json"
ALERTS = ROOT / "packaging" / "prometheus" / "fluxrt-alerts.yml"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "atan2",
}  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(metric, label)` query) selects."""
    grafana = _LABEL_VALUES.match(expr)
    if grafana is not None:
        expr = grafana.group(1) or ""
    text = _STRINGS.sub(" ", expr)
    text = _VARIABLES.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation called
        names.add(name)
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def queries() -> dict[str, str]:
    """Every PromQL text of the dashboard and the rules, named by where it is."""
    found = {}
    dashboard = _dashboard()
    for variable in dashboard["templating"]["list"]:
        found[f"variable {variable['name']}"] = variable["query"]["query"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for rule in _alerts():
        found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def unknown_names(exported: set[str], texts: dict[str, str]) -> dict[str, list[str]]:
    """Where a query names a metric not in `exported`, or none at all."""
    problems = {}
    for where, text in texts.items():
        names = metric_names(text)
        missing = sorted(names - exported) or ([] if names else ["(no metric at all)"])
        if missing:
            problems[where] = missing
    return problems


# ---- the tokenizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("fluxrt_connections", {"fluxrt_connections"}),
        (
            'sum by (code, instance) (rate(fluxrt_errors_total{code="fluxrt_nope", job=~"$job"}[$__rate_interval]))',
            {"fluxrt_errors_total"},
        ),
        (
            "sum(rate(a_sum[5m] offset 1h)) / on (instance) group_left (node) sum without (x) (rate(a_count[5m]))",
            {"a_sum", "a_count"},
        ),
        (
            "(process_open_fds / process_max_fds > 0.9) and on (job, instance) up",
            {"process_open_fds", "process_max_fds", "up"},
        ),
        ('histogram_quantile(0.99, sum by (le) (rate(h_bucket{le!="+Inf"}[1m])))', {"h_bucket"}),
        ("max_over_time(g[10m:30s]) > bool 1e3", {"g"}),
        ('{__name__=~"fluxrt_.*"}', set()),
        ('label_values(fluxrt_uptime_seconds{job=~"$job"}, instance)', {"fluxrt_uptime_seconds"}),
        ("label_values(instance)", set()),
        ("${DS} ${instance:regex} [[job]] metric_x", {"metric_x"}),
    ],
)
def test_metric_names_are_what_an_expression_selects(expr, names):
    assert metric_names(expr) == names


def test_a_query_naming_something_unexported_or_nothing_is_found():
    exported = {"fluxrt_connections", "fluxrt_errors_total"}
    texts = {"ok": "sum(fluxrt_connections)", "typo": "rate(fluxrt_error_total[5m])", "none": "vector(1)"}
    assert unknown_names(exported, texts) == {"typo": ["fluxrt_error_total"], "none": ["(no metric at all)"]}


# ---- the files -----------------------------------------------------------------------------------------------


def test_the_dashboard_imports_with_a_prometheus_of_ones_choice():
    dashboard = _dashboard()
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for source in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_each_alert_rule_is_complete_and_the_asked_for_ones_are_there():
    rules = _alerts()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    watched = set().union(*(metric_names(rule["expr"]) for rule in rules))
    assert {
        "fluxrt_changefeed_lag_seconds",
        "fluxrt_slow_consumer_closes_total",
        "fluxrt_cluster_engine_up",
        "fluxrt_connections_limit",
        "fluxrt_tls_certificate_expiry_timestamp_seconds",
    } <= watched


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_promtool_reads_the_rules_and_every_dashboard_query(tmp_path: Path):
    dashboard_rules = [
        {"record": f"dashboard:query_{i}", "expr": text.replace("$__rate_interval", "5m")}
        for i, (where, text) in enumerate(queries().items())
        if where.startswith("panel ")
    ]
    as_rules = tmp_path / "dashboard.yml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": dashboard_rules}]}))
    for path in (ALERTS, as_rules):
        result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---- against a live node -------------------------------------------------------------------------------------


async def test_every_query_names_a_metric_a_node_exports(start_server, db, tmp_path):
    # With TLS too, for the certificate's expiry.
    ca = make_ca(tmp_path)
    with redis_server() as redis:
        server = await start(
            start_server,
            db,
            server=ca.server_settings(),
            cluster={"redis_url": redis.url, "node_id": "dash", "prefix": "dash"},
        )
        with trio.fail_after(10):
            while server.db.changefeed.lag() is None or server.cluster.cluster_statistics().state != "up":
                await trio.sleep(0.01)
        exported = series_names((await http_get(server, "/metrics", ssl_context=ca.client_context()))[2])
        assert {
            "fluxrt_changefeed_lag_seconds",
            "fluxrt_cluster_engine_up",
            "fluxrt_errors_total",
            "fluxrt_tls_certificate_expiry_timestamp_seconds",
        } <= exported
        texts = queries()
        assert len(texts) > 40
        assert unknown_names(exported, texts) == {}
        await server.shutdown()
