"""Mixed precision per node for dynamic int8: sensitive MatMuls keep int8 weights but fp32 activations.

Dynamic int8 (``MatMulInteger``) quantizes each MatMul's *activations* per tensor to uint8 at run
time. In a transformer the FFN projections see activations with outliers (after GELU), and that is
where almost all of the error comes from: on all-MiniLM-L6-v2 the mean cosine to fp32 is 0.993 but
the worst sentence falls to 0.977 and about one sentence in ten changes its nearest neighbour.

Keeping those nodes in fp32 costs 3 bytes a weight (one FFN projection of MiniLM is +1.8 MB, so the
model falls below 3.5x smaller than fp32 after two). Instead the sensitive nodes become onnxruntime's
weight-only ``MatMulNBits`` (8-bit weights in blocks of 32 with their own scales, activations stay
fp32; ``accuracy_level = 4`` computes with int8 dot products on block-quantized activations): as
small as int8, close to fp32 in accuracy, slower than ``MatMulInteger`` but faster than fp32.

Which nodes: ``weight_only_nodes = "auto"`` ranks every quantizable MatMul by the error dynamic
quantization adds to *its own output* on the calibration set (a numpy simulation of what
``quantize_dynamic`` does: per-tensor asymmetric uint8 activations per sample, per-column symmetric
int8 weights), then tries the k most sensitive for k = 0, 2, 4, ... and keeps the first model whose
outputs pass the build's own gates (mean budget and task-matched checks), tightened by a margin, on
the *calibration* set (never the evaluation set), against the unquantized model's own outputs: the
search controls quantization error only (for the input model that is the fp32 original; for a
student, the student in fp32). A list of node-name regular expressions picks the nodes by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from converter import metrics
from converter.errors import QuantizationError


def quantizable_matmuls(model: Any) -> list[str]:
    """Names of MatMul nodes whose second input is a constant weight."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def _simulated_error(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(squared error, squared norm) of x @ w under dynamic uint8 activations and per-column int8 weights."""
    x = x.astype(np.float64)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    wscale = np.maximum(np.max(np.abs(w), axis=0, keepdims=True), 1e-12) / 127.0
    wq = np.clip(np.round(w / wscale), -127, 127) * wscale
    y = x @ w
    return float(np.sum((xq @ wq - y) ** 2)), float(np.sum(y ** 2))


def rank_sensitivity(base: bytes, cal: dict[str, np.ndarray], limit: int = 48) -> list[tuple[str, float]]:
    """Quantizable MatMuls, most sensitive first, with their relative output error on calibration data."""
    import onnx
    from onnx import numpy_helper

    from converter.onnx_variants import ort_session

    model = onnx.load_from_string(base)
    names = quantizable_matmuls(model)
    nodes = {n.name: n for n in model.graph.node}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    probe = onnx.load_from_string(base)
    existing = {o.name for o in probe.graph.output}
    inputs = []
    for name in names:
        tensor = nodes[name].input[0]
        if tensor not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
            existing.add(tensor)
        inputs.append(tensor)
    sess = ort_session(probe.SerializeToString())
    out_names = [o.name for o in sess.get_outputs()]
    n = min(limit, len(next(iter(cal.values()))))
    err = dict.fromkeys(names, 0.0)
    norm = dict.fromkeys(names, 0.0)
    for i in range(n):  # one sample per run, as on a device: dynamic ranges are per inference
        got = dict(zip(out_names, sess.run(None, {k: v[i : i + 1] for k, v in cal.items()}), strict=True))
        for name, tensor in zip(names, inputs, strict=True):
            w = weights[nodes[name].input[1]]
            x = got[tensor].reshape(-1, w.shape[0])
            e, s = _simulated_error(x, w)
            err[name] += e
            norm[name] += s
    ranked = [(name, float(np.sqrt(err[name] / max(norm[name], 1e-30)))) for name in names]
    return sorted(ranked, key=lambda t: (-t[1], t[0]))


def weight_only(base: bytes, nodes: list[str], block_size: int = 32, accuracy_level: int = 4) -> bytes:
    """Replace ``nodes`` (MatMuls) by onnxruntime's 8-bit weight-only ``MatMulNBits``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load_from_string(base)
    others = [n for n in quantizable_matmuls(model) if n not in nodes]
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=others)
    q.process()
    out = q.model.model if hasattr(q.model, "model") else q.model
    return bytes(out.SerializeToString())


def select(patterns: list[str], names: list[str]) -> list[str]:
    """Node names matched by any of the regular expressions (full match, or search when it has no anchor)."""
    chosen = [n for n in names if any(re.search(p, n) for p in patterns)]
    unmatched = [p for p in patterns if not any(re.search(p, n) for n in names)]
    if unmatched:
        raise QuantizationError(f"weight_only_nodes patterns {unmatched} match no quantizable MatMul",
                                variant="onnx-int8-dynamic",
                                fix=f"use names like {names[:2]} (regular expressions are allowed)")
    return chosen


def search(base: bytes, work: Path, quantize: Any, cal: dict[str, np.ndarray], output_index: int, gate: Any,
           fp32_size: int, min_smaller_x: float, max_nodes: int) -> tuple[bytes, list[str], dict[str, Any]]:
    """Smallest set of most-sensitive nodes in weight-only int8 whose model passes ``gate`` on calibration data.

    ``quantize(model_bytes, excluded_nodes) -> bytes`` builds the dynamic int8 model; ``gate(outputs,
    reference) -> (passed, summary)`` applies the build's gates. Stops at ``max_nodes`` or when the model
    would no longer be ``min_smaller_x`` smaller than fp32, and reports every try.
    """
    from converter.onnx_variants import ort_session

    ranked = rank_sensitivity(base, cal)
    n = len(next(iter(cal.values())))

    def outputs(model: bytes) -> np.ndarray:  # one sample per run, as on a device
        sess = ort_session(model)
        return np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in cal.items()})[output_index]
                               for i in range(n)])

    # The knob is quantization, so the search compares with this model's own fp32 outputs: for a student
    # that is its fp32 self, not the teacher (whose distance the quantizer cannot change).
    reference = outputs(base)
    tries: list[dict[str, Any]] = []
    top = min(max_nodes, len(ranked))
    steps = sorted({0, *range(2, top + 1, 2), top})
    best: tuple[bytes, list[str]] | None = None
    for k in steps:
        nodes = [name for name, _ in ranked[:k]]
        model = quantize(weight_only(base, nodes) if nodes else base, nodes)
        passed, summary = gate(outputs(model), reference)
        smaller = fp32_size / len(model)
        tries.append({"weight_only_nodes": k, "calibration": summary, "smaller_x": round(smaller, 3),
                      "passed": passed})
        if smaller < min_smaller_x:
            break
        best = (model, nodes)
        if passed:
            break
    if best is None:
        raise QuantizationError("no mixed-precision model stays min_smaller_x smaller than fp32",
                                variant="onnx-int8-dynamic", fix="lower min_smaller_x or max_weight_only_nodes")
    info = {"selection": "auto: most sensitive first, until the gates pass on the calibration set",
            "sensitivity": [{"node": n, "relative_error": round(e, 5)} for n, e in ranked[:max(8, len(best[1]))]],
            "tries": tries}
    return best[0], best[1], info


def gate_on(spec_checks: metrics.CheckSpec, task: str, metric: str, budget: float, *,
            margin: float = 0.25) -> Any:
    """The build's gate as a function of (outputs, fp32 outputs) on calibration data (no labels needed).

    The search is stricter than the final gate by ``margin`` (a share of the room each limit leaves:
    with 0.25 a worst-case cosine limit of 0.98 becomes 0.985, a 90 % agreement 92.5 %, a mean budget
    of 0.01 becomes 0.0075): what passes on the calibration set only just may fail on the evaluation set.
    """
    from dataclasses import replace

    def tighten(limit: float | None) -> float | None:
        return None if limit is None else limit + (1.0 - limit) * margin

    spec_checks = replace(spec_checks, min_cosine=tighten(spec_checks.min_cosine),
                          p5_cosine=tighten(spec_checks.p5_cosine), nn_agreement=tighten(spec_checks.nn_agreement))
    budget = budget * (1.0 - margin)

    def gate(out: np.ndarray, ref: np.ndarray) -> tuple[bool, dict[str, float]]:
        summary: dict[str, float] = {}
        ok = True
        if metric == "cosine":
            mean = metrics.mean_cosine(out, ref)
            summary["mean_cosine"] = round(mean, 5)
            ok = 1.0 - mean <= budget + 1e-12
        elif metric in ("agreement", "accuracy", "f1"):
            agree = metrics.agreement(out, ref)
            summary["agreement"] = round(agree, 5)
            ok = 1.0 - agree <= budget + 1e-12
        for c in metrics.checks(spec_checks, task, out, ref, None):
            summary[c.name] = round(c.value, 5)
            ok = ok and c.passed
        return ok, summary

    return gate
