"""A real Prometheus scrapes the running operator and evaluates the dashboard and the rules.

The session's `lathe_operator` fixture (conftest.py) runs the operator and exposes its metrics
URL. This module starts a Prometheus 2.42+ on 127.0.0.1 that scrapes that URL every second and
loads charts/lathe/rules/lathe-rules.yaml, then sends every dashboard query and every rule
expression through /api/v1/query: each must come back with status success. Prometheus is
installed with scripts/tools/prometheus.sh when it is missing; the tests skip when that fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bed import REPO, BedError, Component, _kill_with_parent, free_port, wait_until

DASHBOARD = REPO / "charts" / "lathe" / "dashboards" / "lathe.json"
RULES = REPO / "charts" / "lathe" / "rules" / "lathe-rules.yaml"
INSTALL_SCRIPT = REPO / "scripts" / "tools" / "prometheus.sh"
# The operator's scrape job: a name that the default operator job regex must match.
OPERATOR_JOB = "lathe-operator"
SCRAPE_INTERVAL = "1s"
STARTUP_TIMEOUT_SECONDS = 60.0
# Values for Grafana's built-in variables; a range of many scrapes gives rate() samples.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass
class Query:
    """One PromQL expression and where it comes from, for test ids and messages."""

    source: str
    expr: str


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Return a value for every dashboard variable: a textbox's default, `.*` for the rest."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "textbox":
            values[variable["name"]] = variable["query"]
        else:
            values[variable["name"]] = ".*"
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"The dashboard query {expr!r} uses the undefined variable ${name}.")
        return values[name]

    return VARIABLE.sub(replace, expr)


def dashboard_queries() -> list[Query]:
    dashboard = json.loads(DASHBOARD.read_text())
    values = dashboard_variables(dashboard)
    queries = []
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                queries.append(Query(f"{nested['title']} {target['refId']}",
                                     substitute(target["expr"], values)))  # fmt: skip
    for variable in dashboard["templating"]["list"]:
        match = LABEL_VALUES.fullmatch(variable.get("definition", ""))
        if match:
            queries.append(Query(f"variable {variable['name']}", substitute(match[1], values)))
    return queries


def rule_queries() -> list[Query]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        Query(rule.get("alert") or rule["record"], rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def find_prometheus() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    result = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    lines = result.stdout.strip().splitlines()
    path = shutil.which("prometheus", path=lines[-1]) if result.returncode == 0 and lines else None
    if not path:
        pytest.skip(
            f"prometheus is not installed and {INSTALL_SCRIPT.name} failed (exit "
            f"{result.returncode}): {result.stderr.strip()[-500:]}\nInstall Prometheus 2.42 or "
            f"later (Debian: apt-get install prometheus) so that prometheus is on PATH."
        )
    return path


def write_config(directory: Path, metrics_url: str) -> Path:
    url = urllib.parse.urlsplit(metrics_url)
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": OPERATOR_JOB,
            "scheme": url.scheme or "http",
            "metrics_path": url.path or "/metrics",
            "static_configs": [{"targets": [url.netloc]}],
        }],
    }  # fmt: skip
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class PrometheusServer:
    """A running Prometheus and its HTTP API."""

    url: str
    component: Component

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """GET an API path and return the decoded JSON body, also for 4xx error responses."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def operator_target(self) -> dict[str, Any] | None:
        targets = self.get("/api/v1/targets", state="active")["data"]["activeTargets"]
        return next((t for t in targets if t["labels"].get("job") == OPERATOR_JOB), None)

    def scraped(self) -> bool:
        target = self.operator_target()
        return target is not None and target["health"] == "up"

    def rules_evaluated(self) -> bool:
        # NB: Prometheus reports the zero time, 0001-01-01T00:00:00Z, for a rule not yet run.
        groups = self.get("/api/v1/rules")["data"]["groups"]
        evaluated = [
            not rule.get("lastEvaluation", "0001").startswith("0001")
            for group in groups
            for rule in group["rules"]
        ]
        return bool(evaluated) and all(evaluated)


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def prometheus(
    lathe_operator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """A Prometheus that scrapes the operator and has evaluated every rule once."""
    binary = find_prometheus()

    directory = tmp_path_factory.mktemp("prometheus")
    config = write_config(directory, lathe_operator.metrics_url)
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory, preexec_fn=_kill_with_parent,
        )  # fmt: skip
    component = Component("prometheus", process, log_path)
    server = PrometheusServer(f"http://127.0.0.1:{port}", component)

    try:
        wait_until(lambda: http_ready(f"{server.url}/-/ready"), "Prometheus to be ready",
                   component, STARTUP_TIMEOUT_SECONDS)  # fmt: skip
        wait_until(server.scraped, f"a successful scrape of {lathe_operator.metrics_url}",
                   component, STARTUP_TIMEOUT_SECONDS)  # fmt: skip
        wait_until(server.rules_evaluated, "the first evaluation of every rule",
                   component, STARTUP_TIMEOUT_SECONDS)  # fmt: skip
    except BedError as error:
        process.kill()
        process.wait()
        pytest.fail(str(error))
    yield server

    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_operator_target_scraped(prometheus: PrometheusServer) -> None:
    target = prometheus.operator_target()
    assert target is not None
    assert target["health"] == "up"
    assert target["lastError"] == ""


def test_operator_series_ingested(prometheus: PrometheusServer) -> None:
    """The scrape carries the operator's registry, not only Prometheus' own up series."""
    answer = prometheus.query(f'count({{job="{OPERATOR_JOB}", __name__=~"lathe_.*"}})')
    assert answer["status"] == "success"
    assert answer["data"]["result"], "no lathe_ series were scraped from the operator"


def test_operator_up_matches_dashboard_job(prometheus: PrometheusServer) -> None:
    up = next(query for query in dashboard_queries() if query.expr.startswith("up{"))
    answer = prometheus.query(up.expr)
    assert answer["status"] == "success"
    assert [sample["value"][1] for sample in answer["data"]["result"]] == ["1"]


def test_operator_down_alert_quiet(prometheus: PrometheusServer) -> None:
    """With the operator scraped, the LatheOperatorDown expression returns nothing."""
    rule = next(query for query in rule_queries() if query.source == "LatheOperatorDown")
    answer = prometheus.query(rule.expr)
    assert answer["status"] == "success"
    assert answer["data"]["result"] == []


def test_rules_load_healthy(prometheus: PrometheusServer) -> None:
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {query.source for query in rule_queries()}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.parametrize("query", dashboard_queries(), ids=lambda query: query.source)
def test_dashboard_query_evaluates(prometheus: PrometheusServer, query: Query) -> None:
    answer = prometheus.query(query.expr)
    assert answer["status"] == "success", f"{query.expr}: {answer.get('error')}"


@pytest.mark.parametrize("query", rule_queries(), ids=lambda query: query.source)
def test_rule_expression_evaluates(prometheus: PrometheusServer, query: Query) -> None:
    answer = prometheus.query(query.expr)
    assert answer["status"] == "success", f"{query.expr}: {answer.get('error')}"
