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
    report = run_build(mlp_project(), quiet_console, {"output.latency_rounds": 5})
    assert report["status"] == "ok", report["errors"]
    int8 = variant(report, "onnx-int8")
    assert int8["status"] == "shipped"
    assert int8["drop"] <= 0.01
    assert int8["smaller_x"] > 1.5  # a 4.8 k-parameter MLP: Q/DQ scales and node names weigh in
    assert report["profiles"]["x86-kiosk"]["ship"][0] == "onnx-int8"
    # latency: interleaved rounds, the spread shown, the speed-up paired round by round
    fp32 = variant(report, "onnx-fp32")
    for v in (fp32, int8):
        lat = v["latency"]
        assert lat["rounds"] == 5 and len(lat["round_p50_ms"]) == 5 and lat["runs"] == 10
        assert lat["spread_ms"] == [min(lat["round_p50_ms"]), max(lat["round_p50_ms"])]
    lo, hi = int8["speedup_range"]
    assert lo <= int8["speedup_x"] <= hi


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


def test_task_matched_checks_against_hand_computed() -> None:
    import numpy as np

    ref = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.1]])
    # sample 1 keeps its direction; sample 3 swings towards the x axis: its neighbour becomes sample 0/1
    out = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.8, 0.5, 0.1]])
    spec = metrics.CheckSpec(min_cosine=0.98, p5_cosine=0.5, nn_agreement=0.9)
    found = {c.name: c for c in metrics.checks(spec, "embedding", out, ref, None)}
    cos3 = float(out[3] @ ref[3] / np.linalg.norm(out[3]) / np.linalg.norm(ref[3]))
    assert found["worst_cosine"].value == pytest.approx(cos3) and not found["worst_cosine"].passed
    assert found["worst_cosine"].detail == "sample 3"
    assert found["nn_agreement"].value == pytest.approx(3 / 4) and not found["nn_agreement"].passed
    assert "1 of 4 samples" in found["nn_agreement"].detail
    assert found["p5_cosine"].passed
    # classifiers: class 1 loses one of its two samples; class 0 keeps both
    labels = np.array([0, 0, 1, 1])
    ref_scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.7, 0.3]])
    (c,) = metrics.checks(metrics.CheckSpec(class_budget=0.05), "classification", scores, ref_scores, labels,
                          ("cat", "dog"))
    assert c.name == "class_accuracy_drop" and c.value == pytest.approx(0.5) and not c.passed
    assert c.detail.startswith("class dog: 50.0% vs fp32 100.0% (2 samples)")


def test_defaults_follow_the_task(mlp_project) -> None:
    from converter import load_spec

    spec = load_spec(mlp_project())
    assert spec.checks.class_budget == 0.05 and spec.checks.nn_agreement is None
    emb = load_spec(mlp_project(), {"task.kind": "embedding", "evaluation.metric": "cosine",
                                    "evaluation.budget": 0.01})
    assert emb.checks.min_cosine == pytest.approx(0.98) and emb.checks.nn_agreement == 0.9
    off = load_spec(mlp_project(), {"evaluation.class_budget": False})
    assert off.checks.class_budget is None
    from converter.errors import SpecError

    with pytest.raises(SpecError, match="nn_agreement"):
        load_spec(mlp_project(), {"evaluation.nn_agreement": 1.5})


def test_mean_within_budget_but_one_class_collapses_is_refused(mlp_project, quiet_console) -> None:
    """Overall accuracy may hide a class the int8 model no longer recognises: per-class check refuses it."""
    spec = mlp_project(calibration="tiny_calibration", budget=0.9)
    report = run_build(spec, quiet_console, {"evaluation.name": "digits held-out"})
    int8 = variant(report, "onnx-int8")
    assert int8["drop"] <= 0.9                      # the mean budget alone would have shipped it
    assert int8["status"] == "refused"
    (check,) = int8["checks"]
    assert check["name"] == "class_accuracy_drop" and not check["passed"] and check["value"] > 0.05
    assert "class_accuracy_drop" in int8["error"]["message"]
    assert report["metric"]["dataset"].startswith("digits held-out")
    fp32 = variant(report, "onnx-fp32")
    assert fp32["checks"][0]["passed"] and fp32["status"] == "shipped"
