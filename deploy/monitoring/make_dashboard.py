"""Writes grafana-dashboard.json (the edgepack Model Health board) next to this file.

The JSON is committed; this script is how it is made, so the panels stay consistent (one place for the
queries). Run: ``python deploy/monitoring/make_dashboard.py``. tests/server/test_monitoring.py checks that
every query uses metrics the server exposes and evaluates in a real Prometheus.

Conventions: process metrics (HTTP, check-ins, ingest, gate evaluations) are per replica: ``sum`` them.
Fleet figures read from the database (``edgepack_rollout*``, ``edgepack_devices``, ``edgepack_model_*``) are
the same on every replica: take ``max`` over replicas, never ``sum``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'

ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Rollouts", [
        {"title": "Rollouts by state", "type": "bargauge", "w": 6,
         "targets": [("max by (state) (edgepack_rollouts)", "{{state}}")]},
        {"title": "Active rollouts: current phase", "type": "table", "w": 8,
         "targets": [("max by (rollout, model, version, state) (edgepack_rollout_phase)", "")]},
        {"title": "Gate evaluations by verdict (per s)", "type": "timeseries", "w": 10,
         "targets": [("sum by (verdict) (rate(edgepack_gate_evaluations_total[5m]))", "{{verdict}}")]},
        {"title": "Gate values of active rollouts", "type": "timeseries", "w": 12,
         "targets": [("max by (rollout, gate) (edgepack_rollout_gate_value)", "{{rollout}} {{gate}}"),
                     ("max by (rollout, gate) (edgepack_rollout_gate_threshold)", "{{rollout}} {{gate}} threshold")]},
        {"title": "Gate breaches (last hour)", "type": "bargauge", "w": 12,
         "targets": [("sum by (gate) (increase(edgepack_gate_breaches_total[1h]))", "{{gate}}")]},
    ]),
    ("Model health", [
        {"title": "Devices by version", "type": "timeseries", "w": 8, "stack": True,
         "targets": [(f"sum by (model, version) (max by (model, version, state) (edgepack_devices{{{MODEL}}}))",
                      "{{model}} {{version}}")]},
        {"title": "Requests per second by version", "type": "timeseries", "w": 8,
         "targets": [(f"max by (model, version) (rate(edgepack_model_requests_total{{{MODEL}}}[5m]))",
                      "{{version}}")]},
        {"title": "Accuracy from feedback", "type": "timeseries", "w": 8, "unit": "percentunit",
         "targets": [(f"max by (model, version) (rate(edgepack_model_feedback_correct_total{{{MODEL}}}[15m])) / "
                      f"max by (model, version) (rate(edgepack_model_feedback_count_total{{{MODEL}}}[15m]))",
                      "{{version}}")]},
        {"title": "Error rate", "type": "timeseries", "w": 8, "unit": "percentunit",
         "targets": [(f"max by (model, version) (rate(edgepack_model_errors_total{{{MODEL}}}[15m])) / "
                      f"max by (model, version) (rate(edgepack_model_requests_total{{{MODEL}}}[15m]))",
                      "{{version}}")]},
        {"title": "Crashes per 1,000 requests", "type": "timeseries", "w": 8,
         "targets": [(f"1000 * max by (model, version) (rate(edgepack_model_crashes_total{{{MODEL}}}[15m])) / "
                      f"max by (model, version) (rate(edgepack_model_requests_total{{{MODEL}}}[15m]))",
                      "{{version}}")]},
        {"title": "On-device latency p50 / p95 / p99 (ms)", "type": "timeseries", "w": 8, "unit": "ms",
         "targets": [(f"histogram_quantile({q}, max by (model, version, le) "
                      f"(rate(edgepack_model_latency_ms_bucket{{{MODEL}}}[15m])))", f"{{{{version}}}} p{p}")
                     for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))]},
        {"title": "Input drift (worst-feature PSI) of versions at 100 %", "type": "timeseries", "w": 12,
         "threshold": 0.25,
         "targets": [(f"max by (model, version) (edgepack_model_input_drift{{{MODEL}}})", "{{model}} {{version}}")]},
        {"title": "Drift alerts", "type": "stat", "w": 12,
         "targets": [(f"max by (model, version) (edgepack_model_input_drift_alert{{{MODEL}}})",
                      "{{model}} {{version}}")]},
    ]),
    ("Server and ingest", [
        {"title": "HTTP requests per second by route", "type": "timeseries", "w": 8,
         "targets": [("sum by (route) (rate(edgepack_http_requests_total[5m]))", "{{route}}")]},
        {"title": "HTTP p99 time by route (s)", "type": "timeseries", "w": 8, "unit": "s",
         "targets": [("histogram_quantile(0.99, sum by (route, le) "
                      "(rate(edgepack_http_request_duration_seconds_bucket[5m])))", "{{route}}")]},
        {"title": "Check-ins per second by status", "type": "timeseries", "w": 8,
         "targets": [("sum by (status) (rate(edgepack_checkins_total[5m]))", "{{status}}")]},
        {"title": "Telemetry received / ingested / duplicate per second", "type": "timeseries", "w": 8,
         "targets": [("sum(rate(edgepack_telemetry_received_total[5m]))", "received"),
                     ('sum(rate(edgepack_server_events_total{event="telemetry_ingested"}[5m]))', "ingested"),
                     ('sum(rate(edgepack_server_events_total{event="telemetry_duplicates"}[5m]))', "duplicate")]},
        {"title": "Telemetry dropped by reason (per s)", "type": "timeseries", "w": 8,
         "targets": [("sum by (reason) (rate(edgepack_telemetry_dropped_total[5m]))", "{{reason}}")]},
        {"title": "Ingest lag p50 / p95 (s)", "type": "timeseries", "w": 8, "unit": "s",
         "targets": [(f"histogram_quantile({q}, sum by (le) (rate(edgepack_telemetry_lag_seconds_bucket[5m])))",
                      f"p{p}") for q, p in ((0.5, 50), (0.95, 95))]},
    ]),
]


def panel(spec: dict[str, Any], pid: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid, "title": spec["title"], "type": spec["type"], "datasource": DS,
        "gridPos": {"h": 8, "w": spec["w"], "x": x, "y": y},
        "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(spec["targets"])],
        "fieldConfig": {"defaults": {"unit": spec.get("unit", "short")}, "overrides": []},
        "options": {},
    }
    if spec["type"] == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if spec.get("stack") else "none"}}
    if spec.get("threshold") is not None:
        out["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": [
            {"color": "green", "value": None}, {"color": "red", "value": spec["threshold"]}]}
        out["fieldConfig"]["defaults"]["custom"] = {**out["fieldConfig"]["defaults"].get("custom", {}),
                                                    "thresholdsStyle": {"mode": "dashed"}}
    if spec["type"] == "table":
        out["targets"][0]["format"] = "table"
        out["targets"][0]["instant"] = True
    return out


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, specs in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for spec in specs:
            if x + spec["w"] > 24:
                x, y = 0, y + 8
            panels.append(panel(spec, pid, x, y))
            pid, x = pid + 1, x + spec["w"]
        y += 8
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "model", "type": "query", "datasource": DS, "label": "model", "includeAll": True, "multi": True,
         "query": "label_values(edgepack_model_requests_total, model)", "refresh": 2, "allValue": ".*"},
    ]
    return {"title": "edgepack model health", "uid": "edgepack-model-health", "schemaVersion": 39, "version": 1,
            "editable": True, "tags": ["edgepack"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
            "timezone": "utc", "templating": {"list": variables}, "panels": panels,
            "annotations": {"list": []}}


if __name__ == "__main__":
    out = Path(__file__).with_name("grafana-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
