"""The Keras -> ONNX translator agrees with Keras on every layer type it claims to handle."""

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


def _compare(model, x: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    from converter.keras_onnx import keras_to_onnx
    from converter.runners import run_onnx

    data = keras_to_onnx(model, input_name="image", output_name="out")
    got = run_onnx(data, {"image": x})[0]
    want = np.asarray(model(x, training=False))
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)))


def test_layer_table_matches_keras(keras) -> None:  # type: ignore[no-untyped-def]
    keras.utils.set_random_seed(1)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Rescaling(1 / 4.0, offset=-0.5),
        L.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        L.BatchNormalization(),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
        L.ReLU(),
        L.AveragePooling2D(2, padding="same"),
        L.Conv2D(6, 1, padding="valid"),
        L.MaxPooling2D(2),
        L.Reshape((6,)),
        L.Dense(16, activation="tanh"),
        L.Dropout(0.3),
        L.Dense(5),
        L.Softmax(),
    ])
    # non-trivial BatchNorm statistics
    bn = model.layers[2]
    bn.set_weights([np.linspace(0.5, 1.5, 8), np.linspace(-0.2, 0.2, 8), np.linspace(-1, 1, 8),
                    np.linspace(0.5, 2, 8)])
    x = np.random.default_rng(0).uniform(0, 4, (7, 12, 12, 3)).astype(np.float32)
    assert _compare(model, x) < 1e-5


def test_flatten_after_conv_keeps_keras_order(keras) -> None:  # type: ignore[no-untyped-def]
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, activation="sigmoid"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(1).normal(size=(5, 6, 6, 2)).astype(np.float32)
    assert _compare(model, x) < 1e-5
    gap = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    assert _compare(gap, x) < 1e-5


def test_unknown_layer_is_refused_with_the_way_out(keras) -> None:  # type: ignore[no-untyped-def]
    from converter.keras_onnx import keras_to_onnx

    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(2)])
    with pytest.raises(ModelInputError, match="LSTM") as info:
        keras_to_onnx(model, input_name="x", output_name="y")
    assert ".onnx" in (info.value.fix or "")
