"""Checks of the Grafana dashboard and the Prometheus rules that ship with the chart.

The rules go through the real `promtool` (`check rules`, then the alert unit tests in
tests/fixtures/promtool/). When promtool is missing, scripts/tools/prometheus.sh installs it; when
that fails too, the promtool tests are skipped with the reason. The dashboard is checked for the
structure Grafana needs, and every metric that a query or rule reads must be one the operator
registers or one listed here for Triton and the training pods.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lathe.k8s import metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "lathe" / "dashboards" / "lathe.json"
RULES = REPO / "charts" / "lathe" / "rules" / "lathe-rules.yaml"
RULE_TESTS = REPO / "tests" / "fixtures" / "promtool" / "lathe-rules.test.yaml"
INSTALL_SCRIPT = REPO / "scripts" / "tools" / "prometheus.sh"

# Series that the operator does not register but the dashboard and rules read.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
}
PROMETHEUS_METRICS = {"up"}

EXPECTED_ALERTS = {
    "LatheStageFailed",
    "LatheTrainingStalled",
    "LatheLossNotFinite",
    "LatheTritonErrors",
    "LatheReconcileErrors",
    "LatheOperatorDown",
    "LatheOperatorNoLeader",
}
SEVERITIES = {"info", "warning", "critical"}

# PromQL words that look like metric names but are operators, modifiers or number literals.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip
NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


def metric_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression reads.

    A small lexer rather than a full parser: label matchers, ranges and grouping clauses are
    removed, then every identifier not followed by `(` and not a keyword is a metric name.
    `{__name__=~"a|b"}` selectors contribute each alternative.
    """
    names: set[str] = set()
    for operator, value in NAME_MATCHER.findall(expr):
        names.update(value.split("|") if operator == "=~" else [value])
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = GROUPING.sub("", text)
    for name, call in IDENTIFIER.findall(text):
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def registry_metric_names(registry) -> set[str]:
    """Return the series names that a prometheus_client registry can expose.

    Families without children yield no samples, so the names are derived from each family's
    type, the way the text exposition format writes them.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every panel except rows, including panels nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Return the PromQL of every target and the series selector of every query variable."""
    exprs = [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["definition"])
            assert match, f"variable {variable['name']} is not label_values(SELECTOR, LABEL)"
            exprs.append(match.group(1))
    return exprs


def referenced_variables(text: str) -> set[str]:
    return {next(group for group in match if group) for match in VARIABLE.findall(text)}


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool, installed with scripts/tools/prometheus.sh when missing."""
    path = shutil.which("promtool")
    if path:
        return path
    result = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    bin_dir = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    path = shutil.which("promtool", path=bin_dir) if result.returncode == 0 else None
    if not path:
        pytest.skip(
            f"promtool is not installed and {INSTALL_SCRIPT.name} failed (exit "
            f"{result.returncode}): {result.stderr.strip()[-500:]}\nInstall Prometheus 2.42 or "
            f"later (Debian: apt-get install prometheus) so that promtool is on PATH."
        )
    return path


ALERT_RULES = [rule for rule in load_rules() if "alert" in rule]


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    """Each alert fires on the series meant to fire it and stays quiet on the others."""
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_cover_every_alert() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts - tested == set()


def test_rules_define_expected_alerts() -> None:
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", ALERT_RULES, ids=lambda rule: rule["alert"])
def test_alert_has_severity_and_annotations(rule: dict[str, Any]) -> None:
    assert rule.get("for"), f"{rule['alert']} has no `for` duration."
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook"):
        assert annotations.get(key), f"{rule['alert']} has no {key} annotation."
    assert f"section {rule['alert']}" in annotations["runbook"]


@pytest.mark.parametrize("rule", ALERT_RULES, ids=lambda rule: rule["alert"])
def test_alert_runbook_section_exists(rule: dict[str, Any]) -> None:
    docs = (REPO / "docs" / "monitoring.md").read_text()
    assert re.search(rf"^#+ {rule['alert']}$", docs, re.MULTILINE)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('sum by (kind) (rate(lathe_reconciles_total{result="error"}[5m]))',
         {"lathe_reconciles_total"}),
        ("histogram_quantile(0.95, sum by (kind, le) (rate(a_bucket[$__rate_interval])))",
         {"a_bucket"}),
        ('rate({__name__=~"a_total|b_total", model=~"$model"}[5m])', {"a_total", "b_total"}),
        ("changes(step[30m]) == 0 and step offset 30m and on (kind) (phase > 0)",
         {"step", "phase"}),
        ("loss unless abs(loss) < +Inf or x == NaN or y > 1e308", {"loss", "x", "y"}),
        ('absent(up{job=~".*lathe.*(operator|metrics).*"} == 1)', {"up"}),
        ("ns:requests:rate5m / ignoring (reason) group_left (model) other", {
            "ns:requests:rate5m", "other"}),
    ],
)  # fmt: skip
def test_metric_names_from_promql(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_dashboard_is_grafana_schema_39() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"]
    assert dashboard["title"]


def test_dashboard_panels_have_targets() -> None:
    for panel in query_panels(load_dashboard()):
        assert panel.get("type"), f"panel {panel.get('title')!r} has no type"
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty expr"
            assert target.get("refId"), f"panel {panel['title']!r} has a target without refId"


def test_dashboard_panel_ids_unique() -> None:
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [nested["id"] for panel in dashboard["panels"] for nested in panel.get("panels", [])]
    assert len(ids) == len(set(ids))


def test_dashboard_target_ref_ids_unique() -> None:
    for panel in query_panels(load_dashboard()):
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    """Grafana moves overlapping panels on load, which breaks the intended layout."""
    dashboard = load_dashboard()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_uses_datasource_variable() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in query_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_variables_defined() -> None:
    dashboard = load_dashboard()
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    used = set()
    for text in dashboard_exprs(dashboard):
        used |= referenced_variables(text)
    assert used - GRAFANA_BUILTINS - defined == set()
    assert {"datasource", "namespace", "name", "model", "operator_job"} <= defined


def test_dashboard_training_panels_filter_by_resource() -> None:
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            if "lathe_training_" in target["expr"]:
                assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
                assert 'name=~"$name"' in target["expr"], panel["title"]


def test_dashboard_operator_job_matches_rule() -> None:
    """The dashboard's default operator job regex is the one LatheOperatorDown uses."""
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    rule = next(rule for rule in load_rules() if rule.get("alert") == "LatheOperatorDown")
    assert f'job=~"{variables["operator_job"]["query"]}"' in rule["expr"]


def known_metric_names() -> set[str]:
    recorded = {rule["record"] for rule in load_rules() if "record" in rule}
    operator = registry_metric_names(metrics.REGISTRY)
    return operator | recorded | TRITON_METRICS | PROMETHEUS_METRICS


def test_operator_registry_names_derived() -> None:
    names = registry_metric_names(metrics.REGISTRY)
    assert "lathe_reconciles_total" in names
    assert "lathe_reconcile_duration_seconds_bucket" in names
    assert "lathe_training_step" in names


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queried_metrics_exist(source: str) -> None:
    if source == "dashboard":
        exprs = dashboard_exprs(load_dashboard())
    else:
        exprs = [rule["expr"] for rule in load_rules()]
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used - known_metric_names() == set()


def test_progress_sets_mfu_gauge() -> None:
    """The operator exports the MFU of status.progress, since no training pod is scraped."""
    metrics.set_progress("nlp", "PretrainJob", "mfu-series", {"step": 3, "mfu": 0.41})

    samples = [sample for family in metrics.REGISTRY.collect()
               if family.name == "lathe_training_mfu_ratio" for sample in family.samples
               if sample.labels["name"] == "mfu-series"]
    assert [sample.value for sample in samples] == [0.41]

    metrics.forget("nlp", "PretrainJob", "mfu-series")


def test_phase_series_follows_resource() -> None:
    """lathe_resource_phase has one series per resource, with its current phase."""
    counts = metrics.PhaseCounts()

    def phases() -> dict[str, float]:
        return {
            sample.labels["phase"]: sample.value
            for family in metrics.REGISTRY.collect() if family.name == "lathe_resource_phase"
            for sample in family.samples if sample.labels["name"] == "phase-series"
        }

    counts.set("PretrainJob", "nlp", "phase-series", "Running")
    assert phases() == {"Running": 1.0}
    counts.set("PretrainJob", "nlp", "phase-series", "Suspended")
    assert phases() == {"Suspended": 1.0}
    counts.set("PretrainJob", "nlp", "phase-series", None)
    assert phases() == {}
