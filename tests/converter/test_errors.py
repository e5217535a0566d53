"""Each error path names the step, the variant and the fix; other variants still build; no partial bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.errors import SpecError
from converter.spec import load_spec
from tests.converter.conftest import KERAS_UNCONVERTIBLE_RECIPE, run_build, variant, write_project

STEPS_NO_RESHAPE = [{"op": "scale", "multiply": 0.0625}, {"op": "cast", "dtype": "float32"}]
STEPS_FLOAT64 = [{"op": "scale", "multiply": 0.0625}, {"op": "reshape", "shape": [64]},
                 {"op": "cast", "dtype": "float64"}]


def _no_partial_output(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith((".edgepack", ".part")) or n.startswith(".edgepack-work")], names
    assert "build-report.json" in names and "build-report.md" in names


def test_calibration_data_of_the_wrong_shape(mlp_project, quiet_console) -> None:
    spec = mlp_project()
    report = run_build(spec, quiet_console, {"preprocessing.steps": STEPS_NO_RESHAPE})
    assert report["status"] == "failed"
    err = report["errors"][0]
    assert err["type"] == "CalibrationDataError" and err["step"] == "calibration-data"
    assert "(200, 8, 8)" in err["message"] and "64" in err["message"]
    assert "reshape" in err["fix"]
    _no_partial_output(spec.parent / "out")


def test_calibration_data_of_the_wrong_dtype(mlp_project, quiet_console) -> None:
    spec = mlp_project()
    report = run_build(spec, quiet_console, {"preprocessing.steps": STEPS_FLOAT64})
    err = report["errors"][0]
    assert err["type"] == "CalibrationDataError"
    assert "float64" in err["message"] and "float32" in err["message"] and "cast" in err["fix"]
    _no_partial_output(spec.parent / "out")


def test_empty_evaluation_set(mlp_project, quiet_console, tmp_path: Path) -> None:
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    spec = mlp_project()
    report = run_build(spec, quiet_console, {"evaluation.path": str(empty), "evaluation.factory": ""})
    err = report["errors"][0]
    assert err["type"] == "EvaluationDataError" and err["step"] == "evaluation-data"
    assert "empty" in err["message"] and err["fix"]
    _no_partial_output(spec.parent / "out")


def test_signing_failure_leaves_no_bundle(mlp_project, quiet_console, tmp_path: Path, keys) -> None:
    spec = mlp_project()
    # The key directory is there when the build starts and its private keys are gone when it signs (a USB
    # stick pulled out): the evaluation data factory, which runs mid-build, removes them.
    with (spec.parent / "recipe.py").open("a") as fh:
        fh.write(f"\n\ndef evaluation_then_lose_keys():\n    import shutil\n"
                 f"    shutil.rmtree({str(keys.directory / 'private')!r})\n    return evaluation()\n")
    report = run_build(spec, quiet_console, {"signing.keys": str(keys.directory), "signing.create": False,
                                             "evaluation.factory": "recipe.py:evaluation_then_lose_keys"})
    assert report["status"] == "failed"
    err = report["errors"][0]
    assert err["type"] == "BundleOutputError" and err["step"] == "bundle"
    # everything before signing ran: the variants are in the report
    assert variant(report, "onnx-int8")["value"] is not None
    _no_partial_output(spec.parent / "out")


@pytest.mark.parametrize(("overrides", "needle", "fix"), [
    ({"signing.keys": "no-such-keys", "signing.create": False}, "no key directory at",
     "edgepack keys init --out"),
    ({"model.factory": "", "model.path": "model.onnx"}, "[model] path", "--model"),
    ({"calibration.factory": "missing.py:data"}, "[calibration] factory file", "relative to edgepack.toml"),
    ({"preprocessing.input": "tabular", "preprocessing.steps": [{"op": "standard_scale"}]},
     "standard_scale (steps[0]) learn", "[fit]"),
])
def test_mistakes_are_refused_before_the_long_build(mlp_project, quiet_console, overrides: dict, needle: str,
                                                    fix: str) -> None:
    spec = mlp_project()
    report = run_build(spec, quiet_console, overrides)
    assert report["status"] == "failed" and not report["variants"]  # nothing was built first
    assert needle in report["errors"][0]["message"] and fix in report["errors"][0]["fix"], report["errors"]
    assert set(report["timings"]) <= {"preprocessing + data"}


def test_unconvertible_model_and_unquantizable_op_other_variants_still_build(tmp_path: Path,
                                                                           quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "tflite-fp32", "tflite-int8"]', budget=0.05)
    (spec.parent / "recipe.py").write_text(KERAS_UNCONVERTIBLE_RECIPE)
    report = run_build(spec, quiet_console, {"model.format": "keras", "model.output_names": ["probabilities"],
                                             "targets.profiles": ["rpi4"]})
    onnx = variant(report, "onnx-fp32")
    assert onnx["status"] == "failed"
    assert onnx["error"]["type"] == "ModelInputError" and onnx["error"]["step"] == "load-model"
    assert "Bucketize" in onnx["error"]["message"] and ".onnx" in onnx["error"]["fix"]
    int8 = variant(report, "tflite-int8")
    assert int8["status"] == "failed"
    assert int8["error"]["type"] == "QuantizationError" and int8["error"]["step"] == "quantize"
    assert "SIN" in int8["error"]["message"] and "allow_float_ops" in int8["error"]["fix"]
    assert variant(report, "tflite-fp32")["status"] == "shipped"
    assert report["status"] == "ok" and Path(report["bundle"]["path"]).is_file()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"variants.build": ["onnx-int4"]}, "unknown variants"),
        ({"bundle.version": "1.0"}, "semver"),
        ({"targets.profiles": ["toaster"]}, "toaster"),
        ({"evaluation.metric": "bleu"}, "metric"),
        ({"model.path": "", "model.factory": ""}, "[model] needs"),
        ({"evaluation.budgett": 0.1}, "[evaluation] key 'budgett' is not known"),
        ({"evalution.budget": 0.1}, "section '[evalution]' is not known"),
        ({"variants.onnx-int8.per_chanel": True}, "option 'per_chanel' is not known"),
        ({"task.labels": ["a", "a"]}, "labels must be distinct"),
        ({"evaluation.top_k": "3"}, "top_k must be a whole number"),
        ({"output.strict": "yes"}, "strict must be true or false"),
        ({"profiles.pi-gpu": {"runtimes": ["tensorrt"]}, "targets.profiles": ["pi-gpu"]}, "tensorrt"),
    ],
)
def test_spec_errors_name_the_key(mlp_project, overrides: dict, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(mlp_project(), overrides)
    assert needle in str(info.value)
    assert info.value.step == "spec"


def test_unknown_keys_in_the_file_are_refused_with_the_known_ones(mlp_project) -> None:
    spec = mlp_project()
    text = spec.read_text().replace("latency_runs = 10", "latency_run = 10")
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert "[output] key 'latency_run' is not known" in str(info.value)
    assert "latency_runs" in str(info.value) and "did you mean 'latency_runs'" in (info.value.fix or "")


def test_spec_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "edgepack.toml"
    bad.write_text("[bundle\nname = 1\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="edgepack init"):
        load_spec(tmp_path / "missing.toml")
