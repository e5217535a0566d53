"""The two examples build, verify, pass their golden vectors through real runtimes; builds are reproducible.

Slow (TensorFlow training / torch export), run in CI.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.converter.conftest import REPO, run_build, variant

pytestmark = pytest.mark.slow


def _verify_and_selftest(report: dict[str, Any], keys: Path, dest: Path) -> dict[str, str]:
    from bundles.selftest import run_golden
    from bundles.trust import TrustStore
    from bundles.verify import verify_archive

    trust = TrustStore.from_root_file(keys / "trust" / "root.json")
    bundle = verify_archive(Path(report["bundle"]["path"]), trust, dest)
    assert bundle.content_digest == report["bundle"]["content_digest"]
    runtimes = {}
    for v in bundle.manifest.variants:
        run_golden(bundle, v.id)  # preprocessing parity + outputs within tolerance, real runtime
        runtimes[v.id] = v.runtime
    return runtimes


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from rich.console import Console

    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(REPO / "examples" / "digits", root / "ex",
                    ignore=shutil.ignore_patterns("out", "keys", "__pycache__"))
    console = Console(file=open(root / "log.txt", "w"), width=150)  # noqa: SIM115
    report = run_build(root / "ex" / "edgepack.toml", console, FAST)
    return {"root": root, "report": report, "console": console}


# The example's real training settings (docs/benchmarks.md) shortened for CI: the behaviour under test is
# the same (a pruned and a distilled model through the same gate, shipped when smaller and within budget).
FAST = {"prune.epochs": 1, "distill.epochs": 20, "output.latency_runs": 40, "output.latency_rounds": 4}


# Both digits tests share the module's build: under `--dist loadgroup` the group keeps them on one worker, so
# the example is built once, not once per worker.
@pytest.mark.xdist_group("digits-example")
def test_digits_builds_verifies_and_golden_runs_on_onnxruntime_and_litert(digits: dict[str, Any]) -> None:
    report, root = digits["report"], digits["root"]
    assert report["status"] == "ok", report["errors"]
    runtimes = _verify_and_selftest(report, root / "ex" / "keys", root / "verified")
    assert set(runtimes.values()) == {"onnxruntime", "litert"}
    for vid in ("onnx-int8", "tflite-int8"):
        v = variant(report, vid)
        assert v["status"] in ("shipped", "passed")
        assert v["drop"] <= 0.005          # issue goal: at most 0.5 accuracy points lost
        assert v["quantization"].get("float_ops", []) == []
    # fp16 is built and measured but no CPU profile ships it
    assert variant(report, "onnx-fp16")["status"] == "passed"
    # the stages: a distilled student several times smaller than the int8 of today, gated like the rest
    student = variant(report, "student-tflite-int8")
    assert student["vs_base"]["variant"] == "tflite-int8" and student["vs_base"]["smaller_x"] >= 2.0
    assert report["stages"]["distill"]["student_params"] < report["stages"]["distill"]["teacher_params"] / 3
    assert report["stages"]["prune"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    # each Pi profile prefers the smallest tflite-int8-kind variant that passed the gate
    passing = [v for v in report["variants"] if v["id"].endswith("tflite-int8") and v["drop"] is not None
               and v["drop"] <= 0.005 and all(c["passed"] for c in v["checks"])]
    smallest = min(passing, key=lambda v: (v["size_bytes"], v["id"].count("-")))
    assert report["profiles"]["rpi4"]["ship"][0] == smallest["id"]
    assert report["profiles"]["x86-kiosk"]["ship"][0].endswith("onnx-int8")
    out = root / "ex" / "out"
    assert (out / "build-report.json").is_file() and (out / "build-report.md").is_file()
    assert "## Stages" in (out / "build-report.md").read_text()


@pytest.mark.xdist_group("digits-example")
def test_digits_build_is_deterministic(digits: dict[str, Any], tmp_path: Path) -> None:
    """Same inputs, same package versions -> same content digest, with a different key set (training included)."""
    first = digits["report"]
    again = run_build(digits["root"] / "ex" / "edgepack.toml", digits["console"],
                      {**FAST, "output.dir": str(tmp_path / "out2"), "signing.keys": str(tmp_path / "keys2")})
    assert again["status"] == "ok", again["errors"]
    assert again["bundle"]["content_digest"] == first["bundle"]["content_digest"]
    assert again["manifest"] == first["manifest"]


def test_minilm_builds_within_goals(tmp_path: Path) -> None:
    """The teacher's int8 with the calibration-chosen weight-only nodes meets the issue-14 goals on the named set.

    The distilled student is left out here (training it is a benchmark's job, docs/benchmarks.md); the
    stage itself is tested on a small torch model in test_stages.py.
    """
    from rich.console import Console

    shutil.copytree(REPO / "examples" / "minilm", tmp_path / "ex",
                    ignore=shutil.ignore_patterns("out", "keys", "__pycache__"))
    console = Console(file=open(tmp_path / "log.txt", "w"), width=150)  # noqa: SIM115
    # the nodes the calibration search picks (docs/benchmarks.md), named here to keep the test short; the
    # search itself is tested in test_mixed_precision.py
    nodes = [r"layer\.[0-4]/intermediate/", r"layer\.[13]/output/dense", r"layer\.[345]/attention/self/value"]
    report = run_build(tmp_path / "ex" / "edgepack.toml", console,
                       {"variants.build": ["onnx-fp32", "onnx-int8-dynamic"], "output.latency_runs": 20,
                        "output.latency_rounds": 4, "variants.onnx-int8-dynamic.weight_only_nodes": nodes})
    assert report["status"] == "ok", report["errors"]
    assert report["metric"]["dataset"].startswith("minilm-heldout-200")
    int8 = variant(report, "onnx-int8-dynamic")
    assert int8["status"] == "shipped"
    assert int8["value"] >= 0.99             # mean cosine to the fp32 embeddings
    checks = {c["name"]: c for c in int8["checks"]}
    assert checks["worst_cosine"]["passed"] and checks["worst_cosine"]["limit"] == 0.98
    assert checks["nn_agreement"]["passed"] and checks["nn_agreement"]["limit"] == 0.9
    assert int8["smaller_x"] >= 3.5
    assert len(int8["quantization"]["weight_only_nodes"]) == 10   # sensitive nodes kept at fp32 activations
    runtimes = _verify_and_selftest(report, tmp_path / "ex" / "keys", tmp_path / "verified")
    assert runtimes == {"onnx-int8-dynamic": "onnxruntime", "onnx-fp32": "onnxruntime"}
