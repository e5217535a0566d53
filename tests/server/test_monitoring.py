"""The monitoring files in deploy/monitoring/: the Grafana board's queries and the alert rules use metrics the
server exposes, the Prometheus configuration and rules pass ``promtool``, and every panel's query evaluates
in a real Prometheus (Debian's ``prometheus`` package) scraping a live server fed by simulated devices."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.server.dashboard_scenario import Scenario
from tests.support import services

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC = re.compile(r"\b(edgepack_[a-z0-9_]+)")


def board() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "grafana-dashboard.json").read_text()))


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board()["panels"] if p["type"] != "row" for t in p["targets"]]


def rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_board_is_generated_from_its_script() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", MONITORING / "make_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.dashboard() == board(), "grafana-dashboard.json is stale: run deploy/monitoring/make_dashboard.py"
    ids = [p["id"] for p in board()["panels"]]
    assert len(ids) == len(set(ids))
    for p in board()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        services.service_missing("promtool (apt-get install -y prometheus)")
    assert path is not None
    return path


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    tool = promtool()
    config = tmp_path / "prometheus.yml"  # the shipped config, with its token file made to exist
    token = tmp_path / "token"
    token.write_text("ept_x")
    config.write_text((MONITORING / "prometheus.yml").read_text().replace("/etc/prometheus/edgepack-token",
                                                                          str(token)))
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    for args in (["check", "config", str(config)], ["check", "rules", str(tmp_path / "alerts.yml")]):
        r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def scenario(dashboard_scenario: Scenario) -> Scenario:
    return dashboard_scenario


@pytest.mark.mqtt
def test_every_metric_the_board_and_rules_use_is_exposed(scenario: Scenario) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{scenario.live.url}/metrics", headers={"Authorization": f"Bearer {scenario.viewer}"})
    assert r.status_code == 200
    exposed = set()
    for family in text_string_to_metric_families(r.text):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
    for name in ("_total", "_bucket", "_count", "_sum"):  # families without samples yet are still named
        exposed.update(f"{f}{name}" for f in list(exposed))
    used = {m for _, expr in panel_queries() + rule_queries() for m in METRIC.findall(expr)}
    assert used and not used - exposed, f"queries use metrics the server does not expose: {sorted(used - exposed)}"


@pytest.mark.mqtt
@pytest.mark.slow
def test_every_panel_query_evaluates_in_prometheus(scenario: Scenario) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        services.service_missing("prometheus (apt-get install -y prometheus)")
    assert binary is not None
    work = Path(tempfile.mkdtemp(prefix="edgepack-prom-"))
    port = services.free_port()
    (work / "token").write_text(scenario.viewer)
    target = scenario.live.url.split("://", 1)[1]
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [{"job_name": "edgepack-server", "metrics_path": "/metrics",
                            "authorization": {"type": "Bearer", "credentials_file": str(work / "token")},
                            "static_configs": [{"targets": [target]}]}]}))
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'db'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def query(expr: str) -> dict[str, Any]:
            return dict(httpx.get(f"{api}/query", params={"query": expr}, timeout=30).json())

        deadline = time.monotonic() + 60
        while True:
            try:
                if query("count_over_time(up[1m])").get("data", {}).get("result") and \
                        float(query("count_over_time(up[1m])")["data"]["result"][0]["value"][1]) >= 4:
                    break
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "prometheus did not scrape the server"
            time.sleep(0.5)
        assert query("up")["data"]["result"][0]["value"][1] == "1"
        empty = []
        for title, expr in panel_queries() + rule_queries():
            answer = query(expr.replace("$model", ".*"))
            assert answer["status"] == "success", (title, expr, answer)
            if not answer["data"]["result"]:
                empty.append(title)
        # with a halted and a running rollout, devices on two versions and telemetry flowing, these have data:
        for title in ("Rollouts by state", "Active rollouts: current phase", "Gate values of active rollouts",
                      "Devices by version", "HTTP requests per second by route", "EdgepackRolloutHalted"):
            assert title not in empty, f"{title} has no data; empty: {empty}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
