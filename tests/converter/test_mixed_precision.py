"""Mixed precision for dynamic int8: the most sensitive MatMuls become 8-bit weight-only, chosen on calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.conftest import run_build, variant, write_project

# MatMul against weight tensors (a Linear on 2-D input exports as Gemm, which MatMulNBits does not cover)
TORCH_RECIPE = '''
import numpy as np
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dims = [64, 48, 48, 48, 8]
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(a, b, generator=g) / a ** 0.5)
                                         for a, b in zip(dims, dims[1:])])

    def forward(self, x):
        h = x
        for i, w in enumerate(self.w):
            h = h @ w
            if i < len(self.w) - 1:
                h = torch.nn.functional.gelu(h) * 3.0
        return torch.nn.functional.normalize(h, dim=1)

def _x():
    from sklearn.datasets import load_digits
    return load_digits().images.astype(np.float32)

def model():
    return Net().eval()

def calibration():
    return _x()[600:700], None

def evaluation():
    return _x()[700:900], None
'''


def test_simulated_error_ranks_the_outlier_input_first() -> None:
    from converter.mixed_precision import _simulated_error

    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 16))
    calm = rng.normal(size=(64, 32))
    spiky = calm.copy()
    spiky[0, 0] = 200.0  # one outlier stretches the per-tensor uint8 range: everything else loses precision
    e_calm, n_calm = _simulated_error(calm, w)
    e_spiky, n_spiky = _simulated_error(spiky, w)
    assert e_spiky / n_spiky > 10 * e_calm / n_calm


def test_auto_search_keeps_sensitive_nodes_weight_only_until_the_gates_pass(tmp_path: Path, quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "onnx-int8-dynamic"]', extra='''
[variants.onnx-int8-dynamic]
op_types_to_quantize = ["MatMul"]
per_channel = true
weight_only_nodes = "auto"
min_smaller_x = 1.0
''')
    (spec.parent / "recipe.py").write_text(TORCH_RECIPE)
    report = run_build(spec, quiet_console, {
        "model.format": "torch", "model.output_names": ["embedding"], "evaluation.output": "embedding",
        "task.kind": "embedding", "evaluation.metric": "cosine", "evaluation.budget": 0.01,
        # stricter than plain dynamic int8 reaches on this model: the search must add weight-only nodes
        "evaluation.min_cosine": 0.99999, "output.latency_runs": 10, "output.latency_rounds": 2})
    v = variant(report, "onnx-int8-dynamic")
    q = v["quantization"]
    tries = q["weight_only_search"]["tries"]
    assert tries[0]["weight_only_nodes"] == 0 and not tries[0]["passed"]
    assert [t["weight_only_nodes"] for t in tries] == sorted(t["weight_only_nodes"] for t in tries)
    assert len(q["weight_only_nodes"]) == tries[-1]["weight_only_nodes"] > 0
    ranked = [s["node"] for s in q["weight_only_search"]["sensitivity"]]
    assert q["weight_only_nodes"] == ranked[: len(q["weight_only_nodes"])]  # most sensitive first
    if not tries[-1]["passed"]:  # nothing passed: it tried every node before giving up, and the gate refuses
        assert tries[-1]["weight_only_nodes"] == len(ranked) == 4
        assert v["status"] == "refused" and "worst_cosine" in v["error"]["message"]
    if v["status"] == "shipped":  # 8-bit MatMulNBits needs a newer runtime on the device
        assert report["manifest"]["compatibility"]["runtimes"]["onnxruntime"] == ">=1.22"


def test_named_nodes_must_match(tmp_path: Path, quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "onnx-int8-dynamic"]', extra='''
[variants.onnx-int8-dynamic]
weight_only_nodes = ["no-such-node"]
''')
    (spec.parent / "recipe.py").write_text(TORCH_RECIPE)
    report = run_build(spec, quiet_console, {
        "model.format": "torch", "model.output_names": ["embedding"], "evaluation.output": "embedding",
        "task.kind": "embedding", "evaluation.metric": "cosine", "output.latency_runs": 4,
        "output.latency_rounds": 2})
    err = variant(report, "onnx-int8-dynamic")["error"]
    assert err["type"] == "QuantizationError" and "no-such-node" in err["message"]


pytestmark = pytest.mark.filterwarnings("ignore")
