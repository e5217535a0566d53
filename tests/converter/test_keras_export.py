"""Keras -> ONNX through Keras' own export (tf2onnx): agrees with Keras, names and bytes are the bundle's."""

from __future__ import annotations

import numpy as np
import pytest

from converter.errors import ModelInputError


@pytest.fixture(scope="module")
def keras():  # type: ignore[no-untyped-def]
    from converter.sources import prepare_tensorflow

    prepare_tensorflow()
    import keras

    return keras


def _run(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    from converter.runners import run_onnx

    return run_onnx(data, {"image": x})


def _keras_out(model, x: np.ndarray) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def test_layers_the_old_translator_knew_still_match_keras(keras) -> None:  # type: ignore[no-untyped-def]
    from converter.keras_export import keras_to_onnx

    keras.utils.set_random_seed(1)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((12, 12, 3)), L.Rescaling(1 / 4.0, offset=-0.5),
        L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), L.BatchNormalization(),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2), L.ReLU(), L.AveragePooling2D(2, padding="same"),
        L.Conv2D(6, 1, padding="valid"), L.MaxPooling2D(2), L.Reshape((6,)), L.Dense(16, activation="tanh"),
        L.Dropout(0.3), L.Dense(5), L.Softmax(),
    ])
    model.layers[2].set_weights([np.linspace(0.5, 1.5, 8), np.linspace(-0.2, 0.2, 8), np.linspace(-1, 1, 8),
                                 np.linspace(0.5, 2, 8)])
    x = np.random.default_rng(0).uniform(0, 4, (7, 12, 12, 3)).astype(np.float32)
    data = keras_to_onnx(model, input_names=["image"], output_names=["probs"])
    assert np.max(np.abs(_run(data, x)[0] - _keras_out(model, x)[0])) < 1e-5


def test_layers_beyond_a_layer_table_convert(keras) -> None:  # type: ignore[no-untyped-def]
    """LSTM, causal Conv1D and several outputs: what the removed translator refused (ADR 0003)."""
    from converter.keras_export import keras_to_onnx

    keras.utils.set_random_seed(2)
    L = keras.layers
    inp = keras.Input((16, 2))
    h = L.Conv1D(4, 3, padding="causal", activation="relu")(inp)
    h = L.LSTM(6)(h)
    model = keras.Model(inp, [L.Dense(3, activation="softmax")(h), L.Dense(1)(h)])
    x = np.random.default_rng(1).normal(size=(5, 16, 2)).astype(np.float32)
    data = keras_to_onnx(model, input_names=["image"], output_names=["probs", "score"])
    import onnx

    proto = onnx.load_from_string(data)
    assert [o.name for o in proto.graph.output] == ["probs", "score"]
    assert [i.name for i in proto.graph.input] == ["image"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for got, want in zip(_run(data, x), _keras_out(model, x), strict=True):
        assert np.max(np.abs(got - want)) < 1e-5


def test_same_model_same_bytes_whatever_the_tracing_counters(keras) -> None:  # type: ignore[no-untyped-def]
    from converter.keras_export import keras_to_onnx

    def make():  # type: ignore[no-untyped-def]
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])

    first = keras_to_onnx(make(), input_names=["image"], output_names=["y"])
    # a second model in the same process gets other layer names (conv2d_1, dense_1, ...) and other
    # TensorFlow tracing counters; the ONNX bytes must not depend on them
    second = keras_to_onnx(make(), input_names=["image"], output_names=["y"])
    assert first == second


def test_an_op_without_onnx_equivalent_is_refused_by_name(keras) -> None:  # type: ignore[no-untyped-def]
    import tensorflow as tf

    from converter.keras_export import keras_to_onnx

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                              keras.layers.Lambda(lambda t: tf.math.lgamma(t + 1.0))])
    with pytest.raises(ModelInputError, match="Lgamma") as info:
        keras_to_onnx(model, input_names=["x"], output_names=["y"])
    assert ".onnx" in (info.value.fix or "") and "TFLite" in (info.value.fix or "")
