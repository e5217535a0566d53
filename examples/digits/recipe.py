"""Digits example: data from scikit-learn's bundled digits set and a tiny seeded Keras CNN.

Everything here is deterministic: a fixed split, fixed seeds, TensorFlow op determinism. The
model is trained on each build (a few seconds) instead of being cached outside the output
directory, so the build is reproducible from this file alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEED = 0
N_TRAIN = 1200


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.images))
    return digits.images.astype(np.float32), digits.target.astype(np.int64), order


def calibration() -> tuple[np.ndarray, None]:
    """200 training images (raw 8x8, values 0..16): representative, not the evaluation set."""
    x, _, order = _split()
    return x[order[:200]], None


def training() -> tuple[np.ndarray, np.ndarray]:
    """The 1200 training images (raw) and labels: pruning fine-tunes on them, distillation uses the images only."""
    x, y, order = _split()
    return x[order[:N_TRAIN]], y[order[:N_TRAIN]]


def evaluation() -> tuple[np.ndarray, np.ndarray]:
    """The 597 held-out images and labels."""
    x, y, order = _split()
    return x[order[N_TRAIN:]], y[order[N_TRAIN:]]


def train() -> Any:
    """A small CNN (about 72 k parameters), 12 epochs, seeded."""
    from converter.sources import prepare_tensorflow

    prepare_tensorflow()
    import keras

    # Fresh Keras state: layer names (conv2d, conv2d_1, ...) come from a per-process counter and end up
    # as tensor names in the TFLite file, so a second build in the same process would differ.
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED)
    x, y, order = _split()
    xt, yt = x[order[:N_TRAIN]][..., None] / 16.0, y[order[:N_TRAIN]]
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(xt, yt, epochs=12, batch_size=32, shuffle=True, verbose=0)
    return model
