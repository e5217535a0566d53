"""The accuracy gate: a real int8 variant damaged by unrepresentative calibration is refused."""

from __future__ import annotations

import json

import pytest

from converter import metrics
from tests.converter.conftest import run_build, variant


def test_gate_arithmetic() -> None:
    g = metrics.gate("accuracy", 0.95, 0.97, 0.005)
    assert not g.passed and g.drop == pytest.approx(0.02) and g.over_by == pytest.approx(0.015)
    assert metrics.gate("accuracy", 0.969, 0.97, 0.005).passed
    # lower is better for MAE: a rise is a loss
    assert not metrics.gate("mae", 0.30, 0.20, 0.05).passed
    assert metrics.gate("mae", 0.18, 0.20, 0.0).passed


def test_metrics_against_hand_computed() -> None:
    import numpy as np

    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]])
    labels = np.array([1, 0, 1])
    assert metrics.accuracy(scores, labels) == pytest.approx(2 / 3)
    assert metrics.accuracy(scores, labels, k=2) == 1.0
    assert metrics.f1_macro(scores, labels) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert metrics.mean_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == pytest.approx(0.0)
    assert metrics.agreement(scores, scores[::-1]) == pytest.approx(1 / 3)


def test_good_int8_passes_and_ships(mlp_project, quiet_console) -> None:
    report = run_build(mlp_project(), quiet_console)
    assert report["status"] == "ok", report["errors"]
    int8 = variant(report, "onnx-int8")
    assert int8["status"] == "shipped"
    assert int8["drop"] <= 0.01
    assert int8["smaller_x"] > 1.5  # a 4.8 k-parameter MLP: Q/DQ scales and node names weigh in
    assert report["profiles"]["x86-kiosk"]["ship"][0] == "onnx-int8"


def test_damaged_int8_is_refused_and_report_says_by_how_much(mlp_project, quiet_console) -> None:
    spec = mlp_project(calibration="tiny_calibration", budget=0.005)
    report = run_build(spec, quiet_console)
    int8 = variant(report, "onnx-int8")
    assert int8["status"] == "refused"
    assert int8["drop"] > 0.005
    err = int8["error"]
    assert err["type"] == "AccuracyBudgetError" and err["step"] == "gate" and err["variant"] == "onnx-int8"
    over_points = (int8["drop"] - 0.005) * 100
    assert f"{over_points:.2f} pt over" in err["message"]
    # the fp32 variant still ships; the refused one is not in the bundle
    assert report["status"] == "ok"
    assert [v["id"] for v in report["manifest"]["variants"]] == ["onnx-fp32"]
    md = (spec.parent / "out" / "build-report.md").read_text()
    assert "refused" in md and "pt over" in md
    saved = json.loads((spec.parent / "out" / "build-report.json").read_text())
    assert variant(saved, "onnx-int8")["status"] == "refused"


def test_strict_build_fails_on_a_refused_variant(mlp_project, quiet_console) -> None:
    spec = mlp_project(calibration="tiny_calibration", budget=0.005)
    report = run_build(spec, quiet_console, {"output.strict": True})
    assert report["status"] == "failed" and report["bundle"] is None
    assert not list((spec.parent / "out").glob("*.edgepack"))
