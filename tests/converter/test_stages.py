"""Build stages: pruning and distillation make real, smaller or sparser models, gated like every variant.

Tiny real models (a Keras MLP and a torch MLP on scikit-learn's digits), few epochs: the behaviour
under test is the stage plumbing and what the report says, not the final accuracy of the examples.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.converter.conftest import run_build, variant, write_project

KERAS_RECIPE = '''
import numpy as np

def _split():
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    return d.images.astype(np.float32), d.target.astype(np.int64), order

def model():
    from converter.sources import prepare_tensorflow
    prepare_tensorflow()
    import keras
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y, order = _split()
    m = keras.Sequential([keras.Input((64,), name="x"), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(x[order[:1200]].reshape(-1, 64) / 16.0, y[order[:1200]], epochs=15, verbose=0)
    return m

def training():
    x, y, order = _split()
    return x[order[:1200]], y[order[:1200]]

def calibration():
    x, _, order = _split()
    return x[order[:100]], None

def evaluation():
    x, y, order = _split()
    return x[order[1200:]], y[order[1200:]]
'''

STAGES = '''
[prune]
data = { factory = "recipe.py:training" }
sparsity = 0.5
epochs = 2
learning_rate = 0.0005

[distill]
data = { factory = "recipe.py:training", label_key = "" }
width = 0.25
epochs = 20
temperature = 2.0
learning_rate = 0.003
budget = 0.2
'''


@pytest.fixture(scope="module")
def keras_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import io

    from rich.console import Console

    root = tmp_path_factory.mktemp("stages")
    spec = write_project(root / "p", budget=0.03, extra=STAGES,
                         variants='["onnx-fp32", "onnx-int8", "pruned-onnx-int8", "student-onnx-fp32", '
                                  '"student-onnx-int8"]')
    (spec.parent / "recipe.py").write_text(KERAS_RECIPE)
    return run_build(spec, Console(file=io.StringIO(), width=150),
                     {"model.format": "keras", "model.output_names": ["probabilities"],
                      "evaluation.output": "probabilities", "output.latency_runs": 20,
                      "output.latency_rounds": 4})


def test_pruning_reports_sparsity_and_what_it_buys(keras_report: dict) -> None:
    assert keras_report["status"] == "ok", keras_report["errors"]
    info = keras_report["stages"]["prune"]
    assert info["status"] == "ok" and info["sparsity"] == pytest.approx(0.5, abs=0.01)
    pruned, base = variant(keras_report, "pruned-onnx-int8"), variant(keras_report, "onnx-int8")
    assert pruned["stage"] == "pruned" and pruned["value"] is not None and pruned["checks"]
    # dense tensors: the file does not shrink (per-channel scales may even add a little), the zeros compress
    assert pruned["size_bytes"] >= 0.9 * base["size_bytes"]
    assert pruned["compressed_bytes"] / pruned["size_bytes"] < 0.9 * base["compressed_bytes"] / base["size_bytes"]
    assert pruned["vs_base"]["variant"] == "onnx-int8"


def test_distilled_student_is_smaller_and_gated_by_its_own_budget(keras_report: dict) -> None:
    info = keras_report["stages"]["distill"]
    assert info["student_params"] < info["teacher_params"] / 3
    student = variant(keras_report, "student-onnx-int8")
    assert student["vs_base"]["smaller_x"] > 1.5  # 4x fewer weights; Q/DQ scales and names weigh in
    assert student["drop"] <= 0.2 and student["status"] in ("passed", "shipped", "refused")
    # a student that passes only its stage's looser budget is reported but never shipped automatically
    if student["drop"] > 0.03:
        assert student["main_gate"] is False and student["status"] != "shipped"
        assert "student-onnx-int8" not in keras_report["profiles"]["x86-kiosk"]["ship"]


def test_a_stage_variant_without_its_section_is_refused(mlp_project) -> None:
    from converter import load_spec
    from converter.errors import SpecError

    with pytest.raises(SpecError, match=r"no \[distill\] section"):
        load_spec(mlp_project(variants='["onnx-fp32", "student-onnx-int8"]'))
    with pytest.raises(SpecError, match=r"\[prune\] data"):
        load_spec(mlp_project(extra="[prune]\nsparsity = 0.5\n"))
    with pytest.raises(SpecError, match=r"\[prune\] sparsity"):
        load_spec(mlp_project(extra='[prune]\ndata = { factory = "recipe.py:calibration" }\nsparsity = 1.5\n'))


def test_stage_needs_a_trainable_model(mlp_project, quiet_console) -> None:
    """scikit-learn input: the stage fails with a clear error, the other variants still build."""
    spec = mlp_project(variants='["onnx-fp32", "pruned-onnx-int8"]',
                       extra='[prune]\ndata = { factory = "recipe.py:calibration" }\n')
    report = run_build(spec, quiet_console)
    pruned = variant(report, "pruned-onnx-int8")
    assert pruned["status"] == "failed" and "Keras or PyTorch" in pruned["error"]["message"]
    assert variant(report, "onnx-fp32")["status"] == "shipped"


TORCH_RECIPE = '''
import numpy as np
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(64, 32)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(4)])
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return torch.nn.functional.normalize(self.out(h), dim=1)

def _x():
    from sklearn.datasets import load_digits
    return load_digits().images.astype(np.float32)

def model():
    torch.manual_seed(0)
    return Net().eval()

def training():
    return _x()[:600]

def calibration():
    return _x()[600:700], None

def evaluation():
    return _x()[700:900], None
'''


def test_torch_stages_fewer_layers_and_global_pruning(tmp_path: Path, quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "pruned-onnx-fp32", "student-onnx-fp32"]',
                         extra=textwrap.dedent('''
                         [prune]
                         data = { factory = "recipe.py:training" }
                         sparsity = 0.4
                         epochs = 1
                         learning_rate = 0.0001
                         budget = 0.5
                         [distill]
                         data = { factory = "recipe.py:training" }
                         keep_layers = [0, 2]
                         epochs = 2
                         learning_rate = 0.001
                         budget = 0.5
                         '''))
    (spec.parent / "recipe.py").write_text(TORCH_RECIPE)
    report = run_build(spec, quiet_console, {
        "model.format": "torch", "model.output_names": ["embedding"], "evaluation.output": "embedding",
        "task.kind": "embedding", "evaluation.metric": "cosine", "evaluation.budget": 0.01,
        "output.latency_runs": 10, "output.latency_rounds": 2})
    assert report["status"] == "ok", report["errors"]
    assert report["stages"]["prune"]["sparsity"] == pytest.approx(0.4, abs=0.01)
    student = report["stages"]["distill"]
    assert "layers [0, 2] of 4" in student["student"]
    assert student["student_params"] < student["teacher_params"]
    s = variant(report, "student-onnx-fp32")
    assert s["size_bytes"] < variant(report, "onnx-fp32")["size_bytes"]
    assert {c["name"] for c in s["checks"]} == {"worst_cosine", "nn_agreement"}
