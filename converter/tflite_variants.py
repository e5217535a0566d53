"""The TFLite / LiteRT variants: fp32, fp16 (weights) and full-integer int8, from Keras or a SavedModel.

Full-integer int8 asks the converter for ``TFLITE_BUILTINS_INT8``, but the converter in TF 2.21
still leaves an op without an int8 kernel (``SIN``, for one) in float32 between a Dequantize and
a Quantize, silently. So the result is inspected: an op that computes in float32 makes the
variant fail with a QuantizationError naming the op, unless ``allow_float_ops = true``. The
model keeps float32 input and output tensors (a Quantize op at the entry, a Dequantize at the
exit) so all variants take the same features from the same preprocessing and the device agent
needs no per-variant quantization parameters. fp16 variants store fp16 weights that LiteRT
upcasts before the first CPU inference: a size gain only, which is why CPU profiles skip it.

The post-training quantization path of ``tf.lite.TFLiteConverter`` is marked deprecated in
favour of ai-edge-quantizer, but is what tensorflow-cpu 2.21 ships and what we verified.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import CalibrationDataError, ConversionError, QuantizationError
from converter.sources import LoadedModel, prepare_tensorflow


def _converter(model: LoadedModel, tmp: Path) -> Any:
    tf = prepare_tensorflow()
    if model.keras_model is not None:
        # Keras 3 models convert most reliably through an exported SavedModel artifact.
        export_dir = tmp / "saved"
        model.keras_model.export(str(export_dir), format="tf_saved_model", verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(str(export_dir))
    if model.saved_model_dir is not None:
        return tf.lite.TFLiteConverter.from_saved_model(str(model.saved_model_dir))
    raise ConversionError(
        f"TFLite variants need a Keras or TF SavedModel input; this model is {model.kind}",
        fix="drop the tflite-* variants from [variants] build, or give the Keras/SavedModel original",
    )


def rename_io(data: bytes, input_names: list[str], output_names: list[str]) -> bytes:
    """Name the TFLite input/output tensors like the bundle's features and outputs.

    The converter names them after the SavedModel signature (``serving_default_image:0``,
    ``StatefulPartitionedCall:0``); the device feeds features by the manifest's names, the same
    for every variant, so the names are rewritten in the flatbuffer (and its signature).
    """
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.convert_bytearray_to_object(bytearray(data))
    graph = model.subgraphs[0]
    for idx, name in zip(graph.inputs, input_names, strict=False):
        graph.tensors[idx].name = name.encode()
    for idx, name in zip(graph.outputs, output_names, strict=False):
        graph.tensors[idx].name = name.encode()
    for sig in model.signatureDefs or []:
        for tmap in [*(sig.inputs or []), *(sig.outputs or [])]:
            tname = graph.tensors[tmap.tensorIndex].name
            tmap.name = tname
    return bytes(fb.convert_object_to_bytearray(model))


def convert(model: LoadedModel, precision: str, cal: dict[str, np.ndarray] | None,
            options: dict[str, Any], io_names: tuple[list[str], list[str]] | None = None
            ) -> tuple[bytes, dict[str, Any]]:
    """Convert to one TFLite variant; the returned info goes into the manifest's quantization field."""
    variant = f"tflite-{precision}"
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as tmpdir:
        try:
            conv = _converter(model, Path(tmpdir))
        except ConversionError as exc:
            exc.variant = variant
            raise
        except Exception as exc:
            raise ConversionError(f"loading the model into the TFLite converter failed: {exc}", variant=variant,
                                  fix="check that the model saves as a TF SavedModel") from exc
        import tensorflow as tf

        info: dict[str, Any] = {"method": "tf.lite.TFLiteConverter", "tensorflow": tf.__version__}
        if precision == "fp16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
            info.update(weights="float16", activations="float32 on CPU")
        elif precision == "int8":
            if not cal or len(next(iter(cal.values()))) == 0:
                raise CalibrationDataError("the calibration set is empty", variant=variant,
                                           fix="give [calibration] ~100-500 representative samples")
            arrays = list(cal.values())
            limit = int(options.get("representative_samples", 200))
            n = min(limit, len(arrays[0]))

            def representative() -> Iterator[list[np.ndarray]]:
                for i in range(n):
                    yield [a[i : i + 1] for a in arrays]

            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            info.update(weights="int8", activations="int8", io="float32 (quantize/dequantize at the edges)",
                        representative_samples=n)
        else:
            info.update(weights="float32", activations="float32")
        try:
            data = bytes(conv.convert())
        except Exception as exc:
            text = str(exc)
            ops = sorted(set(re.findall(r"'tf\.(\w+)'|op (\w+) ", text)))
            what = f" (ops: {ops})" if ops else ""
            err = QuantizationError if precision == "int8" else ConversionError
            raise err(f"TFLite conversion failed{what}: {text.strip().splitlines()[-1][:400] if text else exc!r}",
                      variant=variant,
                      fix="build onnx-int8 instead, or replace the op in the model"
                      if precision == "int8" else "check the op is a TFLite builtin") from exc
    if precision == "int8":
        floats = float_ops(data)
        info["float_ops"] = floats
        if floats and not options.get("allow_float_ops", False):
            raise QuantizationError(
                f"ops {floats} cannot be quantized to int8 (no int8 kernel); they would run in float32",
                variant=variant, fix="replace those ops in the model, set allow_float_ops = true under "
                "[variants.tflite-int8] to accept a mixed model, or ship onnx-int8 instead")
    if io_names is not None:
        data = rename_io(data, *io_names)
    _check_loads(data, variant)
    return data, info


def float_ops(data: bytes) -> list[str]:
    """Names of the ops, other than the edge Quantize/Dequantize, that compute in float32."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.convert_bytearray_to_object(bytearray(data))
    found: list[str] = []
    for graph in model.subgraphs:
        for op in graph.operators:
            name = fb.opcode_to_name(model, op.opcodeIndex)
            if name in ("QUANTIZE", "DEQUANTIZE"):
                continue
            tensors = [i for i in [*op.inputs, *op.outputs] if i >= 0]
            if any(graph.tensors[i].type == fb.schema_fb.TensorType.FLOAT32 for i in tensors) \
                    and name not in found:
                found.append(name)
    return found


def _check_loads(data: bytes, variant: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_content=data).allocate_tensors()
    except Exception as exc:
        raise ConversionError(f"LiteRT cannot load the {variant} model: {exc}", variant=variant,
                              fix="report the model; build the ONNX variants meanwhile") from exc
