"""The monitoring files in deploy/: Prometheus rules, their unit tests and config, and the Grafana dashboard.

- promtool (Debian package `prometheus`, installed by `make system-deps`) checks the rules, runs their unit
  tests and checks prometheus.yml; a missing promtool fails these tests, it never skips them;
- every metric the alert rules and the dashboard name is one a real server exposes: the names are read from
  the PromQL in the files (a small tokenizer, below) and compared with a scrape of the shared `server`;
- the dashboard is valid JSON with unique panel ids, one data source throughout (the provisioned one by
  default) and queries promtool accepts as PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, ServerProcess

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "defi-qa.json"
GRAFANA_DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = GRAFANA_DIR / "provisioning" / "dashboards" / "defi-qa.yml"

SEVERITIES = {"critical", "warning", "info"}
RUNBOOK = "docs/deployment.md"
# Series Prometheus itself records for every scrape target: not the app's to expose.
PROMETHEUS_OWN_SERIES = frozenset({"up"})

# Sample names a metric family of each type has in the text format (prometheus_client's parser strips
# `_total` from a counter family's name; `_created` comes with counters and histograms).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


# --- promtool -----------------------------------------------------------------------------------------------


def promtool(*args: str) -> str:
    """Run promtool; its combined output. Fails (never skips) when promtool is not installed."""
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool not installed (Debian package prometheus; `make system-deps`)")
    result = subprocess.run([executable, *args], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, recording and alerting."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def scrape_job() -> dict[str, Any]:
    """The scrape config of prometheus.yml that scrapes the app (the one whose targets are the replicas)."""
    jobs = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    (job,) = [job for job in jobs if any("app1" in target for s in job["static_configs"] for target in s["targets"])]
    return dict(job)


def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(rules())} rules found" in output, output


def test_promtool_unit_tests_pass() -> None:
    output = promtool("test", "rules", str(ALERTS_TEST))
    assert "SUCCESS" in output and "FAILED" not in output, output


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) - fired == set(), "alerts without a case where they fire"
    assert set(alerts()) - quiet == set(), "alerts without a case where they stay quiet"
    assert fired | quiet <= set(alerts()), "unit tests of alerts that do not exist"


def test_every_alert_says_how_bad_and_where_to_read() -> None:
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert "for" in rule, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"].startswith(RUNBOOK), name
        assert "First check" in annotations["description"], name


def test_promtool_checks_the_config() -> None:
    """The file as shipped, with the rule files it loads (compose's scrape needs no token: see its header)."""
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [PROMETHEUS_DIR / name for name in config["rule_files"]] == [ALERTS]
    assert all("authorization" not in job for job in config["scrape_configs"])
    output = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert f"SUCCESS: {len(rules())} rules found" in output, output


def test_rules_and_dashboard_select_the_scrape_job() -> None:
    job = scrape_job()["job_name"]
    selected = {value for expr in rule_expressions() for value in re.findall(r'\bjob="([^"$]+)"', expr)}
    assert selected == {job}
    (variable,) = [item for item in dashboard()["templating"]["list"] if item["name"] == "job"]
    assert variable["current"]["value"] == job


# --- metric names in PromQL -----------------------------------------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
MATCHERS = re.compile(r"\{[^}]*\}")
RANGE = re.compile(r"\[[^\]]*\]")
TOKEN = re.compile(r"[0-9][0-9A-Za-z_.]*|[A-Za-z_:][A-Za-z0-9_:]*|\S")
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}
)
KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def metric_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names a PromQL expression selects.

    Strings, Grafana variables, label matchers `{...}` and ranges `[...]` are removed first; of what is left, an
    identifier is a metric name unless it calls something (`rate(`), is an aggregation or keyword, or is in
    the label list after `by`, `on`, `group_left` and the like.
    """
    text = STRING.sub('""', expr)
    text = GRAFANA_VARIABLE.sub("", text)
    text = MATCHERS.sub(" ", text)
    text = RANGE.sub(" ", text)
    tokens = TOKEN.findall(text)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token in LABEL_LISTS and following == "(":
            index = tokens.index(")", index) + 1
            continue
        if IDENTIFIER.fullmatch(token) and following != "(" and token not in AGGREGATIONS | KEYWORDS:
            names.add(token)
        index += 1
    return names


def test_the_tokenizer_reads_promql() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{job="x", route=~"/ask|{b}"}[5m])) / ignoring(le) group_left(route) '
        "b:c:rate5m offset 1h > 0.5 and on (instance) max(c_total{x='y'} [$__rate_interval]) * 1e3 "
        "or histogram_quantile(0.99, d_seconds_bucket) unless count without (pid) (e) or vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "c_total", "d_seconds_bucket", "e"}


def rule_expressions() -> list[str]:
    return [str(rule["expr"]) for rule in rules()]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the selectors of its query variables."""
    expressions = [target["expr"] for panel in all_panels(dashboard()["panels"]) for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+?)(?:,\s*\w+)?\)", query.strip())
            assert match is not None, query
            expressions.append(match.group(1))
    return expressions


def exposed_sample_names(text: str) -> tuple[set[str], set[str]]:
    """(names with samples now, names every declared family may have) in a /metrics exposition.

    A labelled family shows only `# HELP`/`# TYPE` until its first child is created (no rate-limit rejection
    yet, say); the sample names its type gives it then are counted as exposed.
    """
    sampled: set[str] = set()
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        sampled.update(sample.name for sample in family.samples)
        declared.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return sampled, sampled | declared


def test_rules_and_dashboard_name_only_exposed_metrics(server: ServerProcess) -> None:
    for question in ("What is a flash loan?", "best lasagna recipe with three cheeses?"):
        response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
        assert response.status_code == 200, response.text
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    _, exposed = exposed_sample_names(text)
    recorded = {rule["record"] for rule in rules() if "record" in rule}

    used: dict[str, set[str]] = {}
    for source, expressions in (("alerts.yml", rule_expressions()), ("defi-qa.json", dashboard_expressions())):
        for expr in expressions:
            names = metric_names(expr)
            assert names, f"{source}: no metric found in {expr!r}"
            for name in names:
                used.setdefault(name, set()).add(source)

    unknown = {
        name: sorted(sources)
        for name, sources in used.items()
        if name not in exposed | recorded | PROMETHEUS_OWN_SERIES
    }
    assert unknown == {}, "metrics the server does not expose"
    assert {name for name in used if ":" in name} <= recorded


# --- the Grafana dashboard ----------------------------------------------------------------------------------------


def test_dashboard_panels_ids_and_layout() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24, panel["title"]
        for x in range(position["x"], position["x"] + position["w"]):
            for y in range(position["y"], position["y"] + position["h"]):
                assert (x, y) not in cells, f"panel {panel['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
    assert all(panel.get("targets") for panel in panels if panel["type"] != "row"), "panels without a query"


def test_dashboard_uses_one_datasource_the_provisioned_one() -> None:
    board = dashboard()
    (variable,) = [item for item in board["templating"]["list"] if item["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": "${" + variable["name"] + "}"}
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == reference, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference, panel["title"]
    for item in board["templating"]["list"]:
        if item["type"] == "query":
            assert item["datasource"] == reference, item["name"]
    (provisioned,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert provisioned["type"] == "prometheus" and provisioned["uid"] == variable["current"]["value"]
    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """Each query, its Grafana variables filled in, as a recording rule that `promtool check rules` parses."""
    job = scrape_job()["job_name"]
    filled = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": job, "$instance": ".*"}
    recording: list[dict[str, str]] = []
    for index, expr in enumerate(dashboard_expressions()):
        for variable, value in filled.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        recording.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    output = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(dashboard_expressions())} rules found" in output, output
