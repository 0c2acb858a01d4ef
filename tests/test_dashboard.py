"""The Grafana dashboard: importable into any Grafana (a Prometheus datasource input) and valid against Grafana's own
schema. Grafana is not installable here (not in Debian, PyPI or npm), so the JSON is type-checked with the TypeScript
compiler against the types Grafana generates from its schema (npm ``@grafana/schema``, pinned in
monitoring/package-lock.json): the dashboard as a whole, and each time-series panel's options and field config.
Unknown keys, missing required keys, wrong types and enum values outside the schema are errors. Its PromQL is run
against a real Prometheus in test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
DATASOURCE = "${DS_PROMETHEUS}"
TORCHSERVE_METRICS = {"ts_inference_requests_total", "ts_queue_latency_microseconds", "Requests4XX", "Requests5XX",
                      "QueueTime", "WorkerLoadTime"}
SCHEMA = "@grafana/schema/dist/esm/raw"
CHECK = """import type {{ Dashboard }} from "{schema}/dashboard/x/Dashboard_types.gen";
import type {{ Options, FieldConfig }} from "{schema}/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";
// Grafana's string enums, as the string values JSON has
type Plain<T> = T extends string ? `${{T}}` : T extends (infer U)[] ? Plain<U>[]
  : T extends object ? {{ [K in keyof T]: Plain<T[K]> }} : T;
export const dashboard: Plain<Dashboard> = {dashboard};
export const options: Plain<Options>[] = {options};
export const custom: Plain<FieldConfig>[] = {custom};
"""


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(dashboard: dict) -> list[dict]:
    return [target for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.fixture(scope="module")
def tsc() -> Path:
    """TypeScript and @grafana/schema from monitoring/package-lock.json (installed with npm ci when missing)."""
    if shutil.which("npm") is None:
        pytest.fail("npm is not installed: run ./install.sh")
    compiler = MONITORING / "node_modules" / ".bin" / "tsc"
    if not compiler.exists():
        installed = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=MONITORING,
                                   capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, f"npm ci in monitoring/ failed:\n{installed.stderr}"
    return compiler


def type_check(tsc: Path, dashboard: dict, folder: Path) -> subprocess.CompletedProcess:
    dashboard = {key: value for key, value in dashboard.items() if not key.startswith("__")}  # import-only keys
    panels = [panel for panel in dashboard["panels"] if panel["type"] == "timeseries"]
    source = CHECK.format(schema=SCHEMA, dashboard=json.dumps(dashboard, indent=1),
                          options=json.dumps([panel.get("options", {}) for panel in panels], indent=1),
                          custom=json.dumps([panel["fieldConfig"]["defaults"].get("custom", {}) for panel in panels]))
    (folder / "node_modules").symlink_to(MONITORING / "node_modules")
    (folder / "check.ts").write_text(source)
    return subprocess.run([str(tsc), "--noEmit", "--strict", "--module", "esnext", "--moduleResolution", "bundler",
                           "--target", "es2022", "check.ts"], cwd=folder, capture_output=True, text=True, timeout=120)


def test_dashboard_matches_grafanas_schema(tsc, tmp_path):
    checked = type_check(tsc, load(), tmp_path)
    assert checked.returncode == 0, checked.stdout[-3000:]


@pytest.mark.parametrize("break_it, error", [
    (lambda d: d["panels"][0].update(gridpos=d["panels"][0].pop("gridPos")), "'\"gridpos\"' does not exist"),
    (lambda d: d["panels"][1]["options"]["legend"].update(displayMode="tabel"), "Type '\"tabel\"' is not assignable"),
    (lambda d: d.pop("schemaVersion"), "schemaVersion"),
])
def test_the_schema_check_catches_mistakes(tsc, tmp_path, break_it, error):
    dashboard = load()
    break_it(dashboard)
    checked = type_check(tsc, dashboard, tmp_path)
    assert checked.returncode != 0 and error in checked.stdout, checked.stdout[-2000:]


def test_dashboard_imports_with_any_prometheus_datasource():
    dashboard = load()
    assert dashboard["__inputs"] == [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                                      "pluginId": "prometheus", "pluginName": "Prometheus",
                                      "description": dashboard["__inputs"][0]["description"]}]
    uses = [panel["datasource"] for panel in dashboard["panels"]] + [t["datasource"] for t in targets(dashboard)]
    uses += [variable["datasource"] for variable in dashboard["templating"]["list"]]
    assert uses and all(use == {"type": "prometheus", "uid": DATASOURCE} for use in uses)
    text = DASHBOARD.read_text()
    assert len(re.findall(r'"uid":', text)) == len(uses) + 1  # the dashboard's own uid; no other datasource uid


def test_dashboard_queries_use_declared_metrics():
    declared = yaml.safe_load((MONITORING / "metrics.yaml").read_text())
    names = {spec["name"] for section in declared.values() for specs in section.values() for spec in specs}
    assert TORCHSERVE_METRICS <= names
    used = set()
    for target in targets(load()):
        used |= {re.sub(r"_(bucket|sum|count)$", "", name)
                 for name in re.findall(r"\b(handler_\w+|ts_\w+|Requests\dXX|QueueTime|WorkerLoadTime)\b",
                                        target["expr"])}
    assert used and used <= names, used - names
    panels = {panel["title"] for panel in load()["panels"]}
    for needed in ("Requests per second by version", "Handler latency p50 / p99 by version",
                   "Error rate by status and version", "Queue time by route", "Worker load time",
                   "Top-1 class mix by version"):
        assert needed in panels
