"""What an ML engineer brings from scikit-learn: a classifier exported by skl2onnx (outputs ``label`` and
``probabilities``), ai.onnx.ml operators int8 cannot quantize, ZipMap outputs, a label list that does not
fit, and preprocessing (``standard_scale``) fitted on the ``[fit]`` training set, never on calibration."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.converter.conftest import run_build, variant

RECIPE = '''
import numpy as np

def _split():
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    # shifted and stretched columns: standard_scale has something to learn
    x = d.images.reshape(-1, 64).astype(np.float32) * 3.0 + 40.0
    return x, d.target.astype(np.int64), order

def train():
    x, y, order = _split()
    return x[order[:1000]], y[order[:1000]]

def calibration():
    # deliberately not like training data: a scaler fitted here would be wrong
    x, _, order = _split()
    return x[order[1000:1100]] * 0.1, None

def evaluation():
    x, y, order = _split()
    return x[order[1100:]], y[order[1100:]]

def model():
    from sklearn.linear_model import LogisticRegression
    x, y = train()
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    return LogisticRegression(max_iter=300).fit((x - mean) / std, y)

def mlp():
    from sklearn.neural_network import MLPClassifier
    x, y = train()
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    return MLPClassifier((32,), max_iter=200, random_state=0).fit((x - mean) / std, y)
'''

SPEC = '''
[bundle]
name = "digits-sk"
version = "1.0.0"

[model]
factory = "recipe.py:model"

[task]
kind = "classification"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[preprocessing]
input = "tabular"
output = "x"
steps = [{ op = "standard_scale" }]

[fit]
factory = "recipe.py:train"

[calibration]
factory = "recipe.py:calibration"

[evaluation]
factory = "recipe.py:evaluation"

[variants]
build = ["onnx-fp32", "onnx-int8"]

[targets]
profiles = ["x86-kiosk"]

[signing]
keys = "keys"
create = true

[output]
latency_runs = 5
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "recipe.py").write_text(RECIPE)
    (tmp_path / "edgepack.toml").write_text(SPEC)
    return tmp_path / "edgepack.toml"


def _shipped_scaler(report: dict) -> dict:
    with zipfile.ZipFile(report["bundle"]["path"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith("preprocessing.json"))
        steps = json.loads(zf.read(name))["steps"]
    return next(s["params"] for s in steps if s["op"] == "standard_scale")


def test_a_skl2onnx_classifier_builds_with_the_class_scores_chosen(project: Path, quiet_console) -> None:
    report = run_build(project, quiet_console)
    assert report["status"] == "ok", report["errors"]
    # outputs label (int64) and probabilities (float): the metric reads the class scores, and says why
    assert report["metric"]["output"] == "probabilities"
    assert "label" in report["metric"]["output_chosen_by"]
    assert report["metric"]["reference"] > 0.9
    # a linear classifier is ai.onnx.ml operators: int8 is refused with a hint that applies
    int8 = variant(report, "onnx-int8")
    assert int8["status"] == "failed"
    assert "ai.onnx.ml" in int8["error"]["message"] and "LinearClassifier" in int8["error"]["message"]
    assert "drop onnx-int8" in int8["error"]["fix"] and "nodes_to_exclude" not in int8["error"]["fix"]
    assert variant(report, "onnx-fp32")["status"] == "shipped"
    # the scaler was fitted on [fit] (training data), and the report says so
    pre = report["preprocessing"]
    assert pre["fitted_on"] == "fit" and pre["samples"] == 1000 and pre["learned"] == ["standard_scale (steps[0])"]
    from sklearn.datasets import load_digits

    x = load_digits().images.reshape(-1, 64).astype(np.float32) * 3.0 + 40.0
    train = x[np.random.default_rng(0).permutation(len(x))[:1000]]
    np.testing.assert_allclose(_shipped_scaler(report)["mean"], train.mean(axis=0), rtol=1e-5)
    md = (Path(report["bundle"]["path"]).parent / "build-report.md").read_text()
    assert "fitted on [fit]" in md and "1000 samples" in md


def test_an_mlp_from_scikit_learn_quantizes_to_int8(project: Path, quiet_console) -> None:
    report = run_build(project, quiet_console, {"model.factory": "recipe.py:mlp",
                                                "calibration.factory": "recipe.py:train"})
    assert report["status"] == "ok", report["errors"]
    assert variant(report, "onnx-int8")["status"] in ("shipped", "passed"), variant(report, "onnx-int8")["error"]


def test_a_label_list_of_the_wrong_length_is_refused(project: Path, quiet_console) -> None:
    report = run_build(project, quiet_console, {"task.labels": ["zero", "one", "two"]})
    assert report["status"] == "failed" and not report["variants"]
    err = report["errors"][0]
    assert "[task] labels names 3 classes" in err["message"] and "'probabilities' has 10" in err["message"]


def test_zipmap_outputs_get_a_fix_that_applies(project: Path, quiet_console, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(project.parent))
    try:
        import recipe
        from skl2onnx import to_onnx
    finally:
        sys.path.remove(str(project.parent))
    x, _ = recipe.train()
    onnx_path = tmp_path / "zipmap.onnx"  # skl2onnx's defaults: output_label + output_probability (ZipMap)
    onnx_path.write_bytes(to_onnx(recipe.model(), x[:1]).SerializeToString())
    report = run_build(project, quiet_console, {"model.factory": "", "model.path": str(onnx_path),
                                                "preprocessing.output": "X"})
    assert report["status"] == "failed"
    err = report["errors"][0]
    assert "output_probability sequence of maps" in err["message"] and "zipmap" in err["fix"]
    assert "[evaluation] output" in err["fix"]


def test_fitting_on_the_evaluation_set_is_reported(project: Path, quiet_console) -> None:
    report = run_build(project, quiet_console, {"fit.factory": "recipe.py:evaluation",
                                                "variants.build": ["onnx-fp32"]}, dry_run=True)
    assert report["status"] == "ok", report["errors"]
    assert "optimistic" in report["preprocessing"]["warning"]
    md = (project.parent / "out" / "build-report.md").read_text()
    assert "Warning: [fit] is the evaluation set" in md
