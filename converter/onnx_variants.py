"""The ONNX variants: fp32 (pre-processed), fp16, int8 static (QDQ) and int8 dynamic.

Known pitfalls handled here (see shared/reference/edge-ml-anchors.md section 1-2):

* ``quant_pre_process`` (symbolic shape inference + ORT graph optimization + ONNX shape
  inference) runs once; every variant starts from its output, as ORT recommends, instead of
  optimizing inside quantization.
* Static int8 uses QDQ with S8S8 ("the first choice" on x86-64 and ARM). Per-channel helps
  wide weight ranges but hurt some models (ORT #11415), so ``per_channel = "auto"`` builds
  both and keeps the one whose outputs are closer to fp32 *on the calibration set* (never
  the evaluation set, which would select on the test data). Per-channel on a Gemm with a
  (1, N) bias crashes in ``_adjust_weight_scale_for_int32_bias`` (ORT #24815), so
  ``QDQDisableWeightAdjustForInt32Bias`` is set with it.
* Dynamic int8 on Conv emits ``ConvInteger`` with u8 input / s8 weight, which older CPU
  providers cannot run (ORT #3130, #15888; 1.32 here runs it, but the manifest admits devices
  with onnxruntime >= 1.16): Conv is left out of dynamic quantization by default.
* fp16 keeps fp32 inputs and outputs (``keep_io_types``) so every variant takes the same
  features; the result is loaded once to catch the Cast-type pitfalls
  (onnxconverter-common #320/#331) as a conversion error rather than a device failure.

Every produced model is loaded in onnxruntime before it is returned: an op the CPU provider
cannot run is reported as a quantization / conversion error naming the op.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import CalibrationDataError, ConversionError, QuantizationError

DYNAMIC_DEFAULT_OPS = ["MatMul", "Gemm", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"]
_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "distribution": "Distribution"}


def ort_session(model: bytes | str | Path, threads: int = 1) -> Any:
    """A CPU session with a fixed thread count (fixed threads keep outputs bit-reproducible)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _check_loads(data: bytes, variant: str, err: type[ConversionError] | type[QuantizationError]) -> None:
    try:
        ort_session(data)
    except Exception as exc:
        text = str(exc)
        op = re.search(r"implementation for (\w+)\((\d+)\)", text)
        what = f"op {op.group(1)} (opset {op.group(2)}) has no CPU kernel" if op else text.splitlines()[0][:300]
        fix = (
            "leave that op type out (op_types_to_quantize / nodes_to_exclude under [variants."
            f"{variant}]), or build onnx-int8 (static QDQ) instead"
            if err is QuantizationError else f"add the op to op_block_list under [variants.{variant}]"
        )
        raise err(f"onnxruntime cannot load the {variant} model: {what}", variant=variant, fix=fix) from exc


def dedupe_opset_imports(proto: Any) -> None:
    """Keep one opset import per domain (the highest). skl2onnx can list the default domain twice, which
    onnxruntime runs but its quantizer refuses ("Failed to find proper ai.onnx domain")."""
    best: dict[str, int] = {}
    for imp in proto.opset_import:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        best[domain] = max(best.get(domain, 0), imp.version)
    if len(best) == len(proto.opset_import):
        return
    del proto.opset_import[:]
    for domain, version in best.items():
        imp = proto.opset_import.add()
        imp.domain, imp.version = domain, version


WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "Attention", "LSTM", "GRU",
                        "EmbedLayerNormalization"})
"""Operators whose weights int8 quantization shrinks and speeds up."""


def check_quantizable(base: bytes, variant: str) -> None:
    """Refuse int8 for a model with nothing int8 can quantize, naming what it is made of.

    scikit-learn models converted by skl2onnx are often ``ai.onnx.ml`` operators (LinearClassifier,
    TreeEnsembleClassifier, ...) that have no int8 form in onnxruntime; "quantizing" them would ship the
    fp32 model under an int8 name.
    """
    import onnx

    nodes = onnx.load_from_string(base).graph.node
    if any(n.op_type in WEIGHT_OPS for n in nodes):
        return
    ml = sorted({n.op_type for n in nodes if n.domain == "ai.onnx.ml"})
    ops = sorted({n.op_type for n in nodes})
    what = (f"its work is done by ai.onnx.ml operators ({', '.join(ml)}), which have no int8 form in onnxruntime"
            if ml else f"it has no {'/'.join(sorted(WEIGHT_OPS))} operator (it has {', '.join(ops)})")
    raise QuantizationError(
        f"nothing in this model can be quantized to int8: {what}", variant=variant,
        fix=f"drop {variant} from [variants] build and ship onnx-fp32 (such models are small and fast in fp32); "
        "int8 pays for neural networks (Conv, MatMul, Gemm, embeddings)")


def preprocess(fp32: bytes, work: Path) -> bytes:
    """ORT's ``quant_pre_process`` on the fp32 reference; the base of every ONNX variant."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = work / "fp32-in.onnx", work / "fp32-pre.onnx"
    src.write_bytes(fp32)
    # When symbolic shape inference is incomplete, onnxruntime dumps "sym_shape_infer_temp.onnx" plus a
    # model-sized external-data file into the *current directory*: keep that inside the work directory.
    cwd = os.getcwd()
    os.chdir(work)
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:
        # Symbolic shape inference fails on some exotic graphs; optimization alone still helps.
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception:
            raise ConversionError(f"quant_pre_process failed: {type(exc).__name__}: {exc}", variant="onnx-fp32",
                                  fix="run onnx.checker / onnx.shape_inference on the input model") from exc
    finally:
        os.chdir(cwd)
    proto = onnx.load(str(dst))
    proto.producer_name, proto.producer_version = "edgepack", ""
    dedupe_opset_imports(proto)
    data = proto.SerializeToString()
    _check_loads(data, "onnx-fp32", ConversionError)
    return bytes(data)


def to_fp16(base: bytes, options: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """fp16 weights and activations, fp32 I/O kept; ops without fp16 kernels stay fp32."""
    import onnx
    from onnxconverter_common import float16

    block = list(options.get("op_block_list", float16.DEFAULT_OP_BLOCK_LIST))
    try:
        source = onnx.load_from_string(base)
        original_casts = {n.name for n in source.graph.node if n.op_type == "Cast"}
        with warnings.catch_warnings():  # "will be truncated to 1e-07": expected clipping, said once below
            warnings.simplefilter("ignore")
            proto = float16.convert_float_to_float16(source, keep_io_types=True, op_block_list=block)
        patched = _fix_float_casts(proto, original_casts)
    except Exception as exc:
        raise ConversionError(f"fp16 conversion failed: {type(exc).__name__}: {exc}", variant="onnx-fp16",
                              fix="add the failing op to op_block_list under [variants.onnx-fp16]") from exc
    data = proto.SerializeToString()
    _check_loads(data, "onnx-fp16", ConversionError)
    return data, {"method": "onnxconverter-common float16", "keep_io_types": True,
                  "op_block_list_size": len(block), "patched_casts": patched,
                  "constants_clipped_to": [1e-7, 1e4]}


def _fix_float_casts(proto: Any, original_casts: set[str]) -> int:
    """Retarget pre-existing ``Cast(to=FLOAT)`` nodes whose output the converter typed as fp16.

    onnxconverter-common rewrites value types but not the ``to`` attribute of Cast nodes that were
    already in the graph (issues #320/#331, fix in PR #328 not released), so ORT refuses the model
    with "Type (tensor(float16)) of output arg ... does not match expected type (tensor(float))".
    Only Casts of the source graph are touched; the ones the converter adds at the I/O are right.
    """
    from onnx import TensorProto

    fp16_values = {vi.name for vi in proto.graph.value_info
                   if vi.type.tensor_type.elem_type == TensorProto.FLOAT16}
    graph_outputs = {o.name for o in proto.graph.output}
    patched = 0
    for node in proto.graph.node:
        if (node.op_type != "Cast" or node.name not in original_casts or node.output[0] in graph_outputs
                or node.output[0] not in fp16_values):
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
                patched += 1
    return patched


class _Reader:
    """CalibrationDataReader over feature batches (chunks keep calibration memory bounded)."""

    def __init__(self, features: dict[str, np.ndarray], chunk: int = 32) -> None:
        n = len(next(iter(features.values())))
        self._batches = [{k: v[i : i + chunk] for k, v in features.items()} for i in range(0, n, chunk)]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _static_once(base_path: Path, out: Path, cal: dict[str, np.ndarray], per_channel: bool,
                 options: dict[str, Any]) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]  # onnxruntime.quantization is untyped
        pass

    method = str(options.get("calibration_method", "minmax")).lower()
    if method not in _CALIBRATION:
        raise QuantizationError(f"calibration_method {method!r} unknown", variant="onnx-int8",
                                fix=f"use one of {sorted(_CALIBRATION)}")
    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if per_channel:
        extra["QDQDisableWeightAdjustForInt32Bias"] = True  # ORT #24815, see module docstring
    extra.update(options.get("extra_options", {}))
    quantize_static(
        str(base_path), str(out), Reader(cal), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        reduce_range=bool(options.get("reduce_range", False)), activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, _CALIBRATION[method]),
        op_types_to_quantize=options.get("op_types_to_quantize"), nodes_to_exclude=options.get("nodes_to_exclude"),
        extra_options=extra,
    )
    return out.read_bytes()


def to_int8_static(base: bytes, work: Path, cal: dict[str, np.ndarray], reference: np.ndarray,
                   options: dict[str, Any], output_index: int = 0) -> tuple[bytes, dict[str, Any]]:
    """Static QDQ int8 calibrated on the user's data; per-channel chosen by calibration error."""
    if not cal or len(next(iter(cal.values()))) == 0:
        raise CalibrationDataError("the calibration set is empty", variant="onnx-int8",
                                   fix="give [calibration] at least ~100 representative samples")
    check_quantizable(base, "onnx-int8")
    base_path = work / "int8-base.onnx"
    base_path.write_bytes(base)
    choice = options.get("per_channel", "auto")
    tries = [False, True] if choice == "auto" else [bool(choice)]
    results: list[tuple[float, bool, bytes]] = []
    errors: list[str] = []
    for pc in tries:
        try:
            data = _static_once(base_path, work / f"int8-pc{int(pc)}.onnx", cal, pc, options)
            _check_loads(data, "onnx-int8", QuantizationError)
        except QuantizationError as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:
            errors.append(f"per_channel={pc}: {type(exc).__name__}: {exc}")
            continue
        out = ort_session(data).run(None, cal)[output_index]
        results.append((float(np.mean(np.abs(out.astype(np.float64) - reference))), pc, data))
    if not results:
        raise QuantizationError(f"static int8 quantization failed: {' | '.join(errors)}", variant="onnx-int8",
                                fix="exclude the failing nodes (nodes_to_exclude) or op types "
                                "(op_types_to_quantize) under [variants.onnx-int8], or try onnx-int8-dynamic")
    err, pc, data = min(results, key=lambda r: (r[0], r[1]))
    info = {"method": "static", "format": "QDQ", "activations": "int8", "weights": "int8",
            "per_channel": pc, "per_channel_choice": choice,
            "calibration_method": str(options.get("calibration_method", "minmax")).lower(),
            "calibration_samples": len(next(iter(cal.values()))),
            "calibration_mean_abs_error": round(err, 8),
            "nodes_excluded": list(options.get("nodes_to_exclude") or [])}
    return data, info


def _dynamic(src_bytes: bytes, work: Path, options: dict[str, Any], exclude: list[str]) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = work / "dyn-base.onnx", work / "dyn.onnx"
    src.write_bytes(src_bytes)
    ops = list(options.get("op_types_to_quantize", DYNAMIC_DEFAULT_OPS))
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops,
                         per_channel=bool(options.get("per_channel", False)),
                         reduce_range=bool(options.get("reduce_range", False)), weight_type=QuantType.QInt8,
                         nodes_to_exclude=[*(options.get("nodes_to_exclude") or []), *exclude],
                         extra_options=options.get("extra_options"))
    except Exception as exc:
        raise QuantizationError(f"quantize_dynamic failed: {type(exc).__name__}: {exc}",
                                variant="onnx-int8-dynamic",
                                fix="exclude the failing nodes (nodes_to_exclude) under [variants.onnx-int8-dynamic]"
                                ) from exc
    data = dst.read_bytes()
    _check_loads(data, "onnx-int8-dynamic", QuantizationError)
    return data


def to_int8_dynamic(base: bytes, work: Path, options: dict[str, Any], *, cal: dict[str, np.ndarray] | None = None,
                    output_index: int = 0, gate: Any = None
                    ) -> tuple[bytes, dict[str, Any]]:
    """Dynamic int8 (weights int8, activations uint8 quantized per inference): for transformers.

    ``weight_only_nodes`` (a list of node-name patterns, or ``"auto"``) keeps the named MatMuls at
    8-bit weights with fp32 activations (``converter.mixed_precision``); "auto" needs the calibration
    data and the build's gate.
    """
    from converter import mixed_precision as mp

    check_quantizable(base, "onnx-int8-dynamic")
    ops = list(options.get("op_types_to_quantize", DYNAMIC_DEFAULT_OPS))
    per_channel = bool(options.get("per_channel", False))
    info: dict[str, Any] = {"method": "dynamic", "format": "QOperator", "activations": "uint8 (per inference)",
                            "weights": "int8", "per_channel": per_channel, "op_types": ops,
                            "nodes_excluded": list(options.get("nodes_to_exclude") or [])}
    choice = options.get("weight_only_nodes")
    if not choice:
        return _dynamic(base, work, options, []), info
    import onnx

    names = mp.quantizable_matmuls(onnx.load_from_string(base))
    if choice == "auto":
        if cal is None or gate is None:
            raise QuantizationError("weight_only_nodes = \"auto\" needs calibration data",
                                    variant="onnx-int8-dynamic", fix="give [calibration] samples")
        data, nodes, search = mp.search(
            base, work, lambda model, nodes: _dynamic(model, work, options, nodes), cal, output_index,
            gate, len(base), float(options.get("min_smaller_x", 3.5)), int(options.get("max_weight_only_nodes", 12)))
        info["weight_only_search"] = search
    else:
        nodes = mp.select([str(p) for p in choice], names)
        data = _dynamic(mp.weight_only(base, nodes), work, options, nodes)
    info.update(weight_only_nodes=nodes, weight_only={"op": "com.microsoft.MatMulNBits", "bits": 8,
                                                      "block_size": 32, "accuracy_level": 4,
                                                      "activations": "fp32"})
    _check_loads(data, "onnx-int8-dynamic", QuantizationError)
    return data, info
