"""Keras -> ONNX through the library path: ``model.export(format="onnx")`` (tf2onnx underneath).

Keras 3 on the TensorFlow backend traces the model's ``call`` into a concrete function and hands it
to tf2onnx, which covers far more than a hand-written layer table (recurrent layers, causal
convolutions, Lambda layers, several inputs and outputs). ADR 0003 records the measured comparison
with the translator edgepack used before and why it was removed.

What this module adds around the library:

* **Unsupported ops are an error, not a log line.** tf2onnx logs ``Unsupported ops: Counter(...)``
  and still writes a model that onnxruntime refuses; the log records are captured and turned into a
  :class:`ModelInputError` naming the ops and the way out.
* **The bundle's names.** Inputs are renamed to the preprocessing's feature names and outputs to
  ``[model] output_names``; the batch dimension is called ``batch`` in every input and output.
* **Deterministic bytes.** Node and intermediate tensor names come from TensorFlow's per-process
  tracing counters (``sequential_1_1/...``); they are replaced by names numbered in graph order, so
  the same model gives the same ONNX file in any process, which the reproducible bundle digest needs.

The caller checks the result against Keras' own outputs (``sources.verify_against``).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from converter.errors import ModelInputError


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextmanager
def _tf2onnx_log() -> Iterator[_Capture]:
    """Capture tf2onnx's warnings and errors (and keep them off the user's terminal)."""
    logger = logging.getLogger("tf2onnx")
    handler = _Capture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _unsupported(records: list[str]) -> list[str]:
    ops: list[str] = []
    for text in records:
        m = re.search(r"Unsupported ops: Counter\(\{(.*)\}\)", text)
        if m:
            ops += [op for op in re.findall(r"'(\w+)'", m.group(1)) if op not in ops]
    return ops


def _input_signature(model: Any, input_names: list[str]) -> list[Any]:
    import tensorflow as tf

    specs = []
    for tensor, name in zip(model.inputs, input_names, strict=True):
        shape = [None, *list(tensor.shape)[1:]]
        specs.append(tf.TensorSpec(shape, tf.as_dtype(str(tensor.dtype)), name=name))
    return specs


def rename_graph(proto: Any, inputs: list[str], outputs: list[str]) -> None:
    """Rename graph I/O to the bundle's names and every other node/tensor to ``n<i>``/``t<i>``.

    Names are given in node order, so the same graph always gets the same names; initializers are
    numbered in their stored order. The first dimension of every graph input and output is renamed
    ``batch`` when it is symbolic.
    """
    graph = proto.graph
    mapping: dict[str, str] = {}
    for vi, name in zip(graph.input, inputs, strict=True):
        mapping[vi.name] = name
    for vi, name in zip(graph.output, outputs, strict=True):
        mapping[vi.name] = name
    # tf2onnx stores small constant initializers in an order that varies between processes: number them by
    # their first use in node order instead, and store them in that order
    inits = {i.name for i in graph.initializer}
    counter = used = 0
    for node in graph.node:
        for inp in node.input:
            if inp in inits and inp not in mapping:
                mapping[inp] = f"w{used}"
                used += 1
        for out in node.output:
            if out and out not in mapping:
                mapping[out] = f"t{counter}"
                counter += 1
    for init in sorted(graph.initializer, key=lambda t: t.SerializeToString()):
        if init.name not in mapping:  # unused: ordered by content
            mapping[init.name] = f"w{used}"
            used += 1

    def new(name: str) -> str:
        return mapping.get(name, name) if name else name

    for i, node in enumerate(graph.node):
        node.name = f"n{i}_{node.op_type}"
        node.input[:] = [new(x) for x in node.input]
        node.output[:] = [new(x) for x in node.output]
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            vi.name = new(vi.name)
    for init in graph.initializer:
        init.name = new(init.name)
    ordered = sorted(graph.initializer, key=lambda t: int(t.name[1:]) if t.name[1:].isdigit() else -1)
    copies = [type(t)() for t in ordered]
    for dst, src in zip(copies, ordered, strict=True):
        dst.CopyFrom(src)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    for vi in [*graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    proto.producer_name, proto.producer_version = "edgepack (keras export, tf2onnx)", ""
    graph.name, graph.doc_string, proto.doc_string = "keras_model", "", ""
    for node in graph.node:
        node.doc_string = ""


def keras_to_onnx(model: Any, *, input_names: list[str], output_names: list[str], opset: int = 17) -> bytes:
    """Export a Keras 3 model to ONNX with ``model.export(format="onnx")``; returns the model bytes.

    Raises:
        ModelInputError: the model's inputs/outputs do not match the names given, tf2onnx lacks an
            op (named in the message), or the export fails for another reason.
    """
    import onnx

    if len(model.inputs) != len(input_names):
        raise ModelInputError(
            f"the Keras model has {len(model.inputs)} inputs but preprocessing produces {len(input_names)} "
            f"features {input_names}", fix="make [preprocessing] output one feature per model input")
    if len(model.outputs) != len(output_names):
        if len(output_names) == 1 and output_names[0] == "output":
            output_names = [f"output_{i}" for i in range(len(model.outputs))]
        else:
            raise ModelInputError(
                f"the Keras model has {len(model.outputs)} outputs but [model] output_names lists "
                f"{output_names}", fix="list one name per model output under [model] output_names")
    with tempfile.TemporaryDirectory(prefix="edgepack-keras-onnx-") as tmp, _tf2onnx_log() as log:
        path = Path(tmp) / "model.onnx"
        try:
            model.export(str(path), format="onnx", verbose=False, opset_version=opset,
                         input_signature=_input_signature(model, input_names))
        except Exception as exc:
            ops = _unsupported(log.records)
            raise ModelInputError(
                f"Keras' ONNX export (tf2onnx) failed: {type(exc).__name__}: {str(exc)[:300]}"
                + (f"; unsupported ops {ops}" if ops else ""),
                fix="export the model to ONNX yourself and set [model] path to the .onnx; the TFLite "
                "variants can still be built from the Keras model") from exc
        ops = _unsupported(log.records)
        if ops:
            raise ModelInputError(
                f"Keras' ONNX export (tf2onnx) has no ONNX equivalent for the TensorFlow ops {ops}",
                fix="replace those ops in the model, or export it to ONNX yourself and set [model] path "
                "to the .onnx; the TFLite variants can still be built from the Keras model")
        proto = onnx.load(str(path))
    rename_graph(proto, input_names, output_names)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelInputError(f"Keras' ONNX export produced an invalid model: {str(exc)[:300]}",
                              fix="export the model to ONNX yourself and set [model] path to the .onnx") from exc
    return bytes(proto.SerializeToString())
