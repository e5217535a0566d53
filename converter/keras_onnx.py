"""Keras (3.x, channels-last) layer graph -> ONNX, for chain-shaped models.

Why our own: tf2onnx is not part of the build extra (it pins old protobuf / numpy and lags
TensorFlow releases), and Keras' own ``export(format="onnx")`` needs it on the TensorFlow
backend. A chain of standard layers maps one-to-one onto ONNX ops, so a small, tested
translator is more dependable than a pinned third-party stack. A layer outside the table
below raises :class:`ModelInputError` naming the layer and the way out (export the model to
ONNX yourself and give the ``.onnx``). Every translation is checked against Keras' own
outputs by the caller (``sources.verify_against``).

Layout: Keras is NHWC, ONNX convolutions are NCHW. The translator tracks the layout of the
running tensor and inserts a Transpose only where the next op needs the other one;
``quant_pre_process`` later folds what it can.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converter.errors import ModelInputError

_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "linear": None}


class _Graph:
    """Accumulates nodes and initializers; tracks the running tensor and its layout."""

    def __init__(self, input_name: str) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.current = input_name
        self.layout = "nhwc"
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        self.current = out
        return out

    def to_nchw(self, rank: int) -> None:
        if rank == 4 and self.layout == "nhwc":
            self.op("Transpose", [self.current], "to_nchw", perm=[0, 3, 1, 2])
            self.layout = "nchw"

    def to_nhwc(self, rank: int) -> None:
        if rank == 4 and self.layout == "nchw":
            self.op("Transpose", [self.current], "to_nhwc", perm=[0, 2, 3, 1])
            self.layout = "nhwc"


def _pads(padding: str) -> dict[str, Any]:
    if padding == "same":
        return {"auto_pad": "SAME_UPPER"}
    if padding == "valid":
        return {"auto_pad": "VALID"}
    raise ValueError(f"padding {padding!r}")


def _activation(g: _Graph, name: str, rank: int, layer: str) -> None:
    if name not in _ACTIVATIONS:
        raise ModelInputError(
            f"layer {layer!r} uses activation {name!r}, which edgepack's Keras translator does not know",
            fix=f"use one of {sorted(_ACTIVATIONS)}, or export the model to ONNX yourself and give the .onnx",
        )
    op = _ACTIVATIONS[name]
    if op == "Softmax":
        g.to_nhwc(rank)
        g.op("Softmax", [g.current], "softmax", axis=-1)
    elif op is not None:
        g.op(op, [g.current], name)


def keras_to_onnx(model: Any, *, input_name: str, output_name: str, opset: int = 17) -> bytes:
    """Translate a chain-shaped Keras model to a serialized ONNX model (fp32, dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelInputError(
            f"the Keras model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "the built-in translator handles one of each",
            fix="export the model to ONNX yourself and set [model] path to the .onnx file",
        )
    in_shape = list(model.inputs[0].shape)
    g = _Graph(input_name)
    rank = len(in_shape)
    for layer in model.layers:
        kind = type(layer).__name__
        cfg = layer.get_config()
        w = [np.asarray(v) for v in layer.get_weights()]
        out_shape = layer.output.shape if hasattr(layer, "output") else None
        if kind in ("InputLayer", "Dropout", "SpatialDropout2D", "GaussianNoise"):
            continue
        if kind == "Rescaling":
            g.op("Mul", [g.current, g.const("scale", np.asarray(cfg["scale"], np.float32))], "rescale")
            if float(cfg.get("offset", 0.0)) != 0.0:
                g.op("Add", [g.current, g.const("offset", np.asarray(cfg["offset"], np.float32))], "offset")
        elif kind in ("Conv2D", "DepthwiseConv2D"):
            g.to_nchw(rank)
            if kind == "Conv2D":
                kernel = w[0].transpose(3, 2, 0, 1)
                group = int(cfg.get("groups", 1))
            else:
                kh, kw, cin, mult = w[0].shape
                kernel = w[0].reshape(kh, kw, cin * mult, 1).transpose(2, 3, 0, 1)
                group = cin
            inputs = [g.current, g.const("W", kernel.astype(np.float32))]
            if cfg.get("use_bias", True):
                inputs.append(g.const("B", w[1].astype(np.float32)))
            g.op(
                "Conv", inputs, "conv", strides=list(cfg["strides"]), dilations=list(cfg["dilation_rate"]),
                group=group, kernel_shape=list(kernel.shape[2:]), **_pads(cfg["padding"]),
            )
            _activation(g, cfg.get("activation", "linear"), rank, layer.name)
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            g.to_nchw(rank)
            pool = list(cfg["pool_size"])
            strides = list(cfg["strides"] or pool)
            if kind == "MaxPooling2D":
                g.op("MaxPool", [g.current], "maxpool", kernel_shape=pool, strides=strides, **_pads(cfg["padding"]))
            else:
                g.op("AveragePool", [g.current], "avgpool", kernel_shape=pool, strides=strides,
                     count_include_pad=0, **_pads(cfg["padding"]))
        elif kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            g.to_nchw(rank)
            g.op("GlobalAveragePool" if kind.startswith("GlobalAverage") else "GlobalMaxPool", [g.current], "gpool")
            g.op("Flatten", [g.current], "flatten", axis=1)
            g.layout, rank = "flat", 2
        elif kind == "Flatten":
            g.to_nhwc(rank)
            g.op("Flatten", [g.current], "flatten", axis=1)
            g.layout, rank = "flat", 2
        elif kind == "Reshape":
            g.to_nhwc(rank)
            target = np.array([-1, *cfg["target_shape"]], dtype=np.int64)
            g.op("Reshape", [g.current, g.const("shape", target)], "reshape")
            rank = len(target)
            g.layout = "nhwc" if rank == 4 else "flat"
        elif kind == "Dense":
            g.to_nhwc(rank)
            g.op("MatMul", [g.current, g.const("W", w[0].astype(np.float32))], "dense")
            if cfg.get("use_bias", True):
                g.op("Add", [g.current, g.const("B", w[1].astype(np.float32))], "bias")
            _activation(g, cfg.get("activation", "linear"), rank, layer.name)
        elif kind == "BatchNormalization":
            if cfg.get("axis") not in (-1, [-1], rank - 1, [rank - 1]):
                raise ModelInputError(f"layer {layer.name!r}: BatchNormalization over axis {cfg.get('axis')}",
                                      fix="normalize the last (channel) axis, or export to ONNX yourself")
            gamma = w[0] if cfg.get("scale", True) else np.ones_like(w[-2])
            beta = w[1] if cfg.get("center", True) else np.zeros_like(w[-2])
            mean, var = w[-2], w[-1]
            mul = (gamma / np.sqrt(var + cfg["epsilon"])).astype(np.float32)
            add = (beta - mean * mul).astype(np.float32)
            if rank == 4:
                g.to_nchw(rank)
                mul, add = mul.reshape(1, -1, 1, 1), add.reshape(1, -1, 1, 1)
            g.op("Mul", [g.current, g.const("bn_mul", mul)], "bn_mul")
            g.op("Add", [g.current, g.const("bn_add", add)], "bn_add")
        elif kind in ("Activation", "ReLU", "Softmax"):
            act = {"ReLU": "relu", "Softmax": "softmax"}.get(kind, cfg.get("activation"))
            if kind == "ReLU" and (cfg.get("max_value") is not None or cfg.get("negative_slope", 0.0)):
                raise ModelInputError(f"layer {layer.name!r}: ReLU with max_value/negative_slope",
                                      fix="use a plain ReLU, or export the model to ONNX yourself")
            _activation(g, str(act), rank, layer.name)
        else:
            raise ModelInputError(
                f"Keras layer {layer.name!r} of type {kind} has no ONNX translation in edgepack",
                fix="export the model to ONNX yourself (e.g. with tf2onnx) and set [model] path to the .onnx; "
                "the TFLite variants can still be built from the Keras file",
            )
        del out_shape
    g.to_nhwc(rank)
    g.op("Identity", [g.current], "out")
    g.nodes[-1].output[0] = output_name
    out_dims = [None if d is None else int(d) for d in model.outputs[0].shape]
    graph = helper.make_graph(
        g.nodes,
        "keras_model",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *in_shape[1:]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", *out_dims[1:]])],
        initializer=g.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgepack")
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())
