"""Fixtures for converter tests: small, real projects written into tmp_path.

``mlp_project`` is the fast one: scikit-learn's bundled digits, an MLPClassifier exported with
skl2onnx, real quantization and real runtimes; a build takes a few seconds. The Keras and
torch examples are exercised by the slow tests.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

RECIPE = '''
import numpy as np

def _split():
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    return d.images.astype(np.float32), d.target.astype(np.int64), order

def model():
    from sklearn.neural_network import MLPClassifier
    x, y, order = _split()
    tr = order[:1200]
    return MLPClassifier((64,), max_iter=300, random_state=0).fit(x[tr].reshape(-1, 64) / 16.0, y[tr])

def calibration():
    x, _, order = _split()
    return x[order[:200]], None

def evaluation():
    x, y, order = _split()
    return x[order[1200:]], y[order[1200:]]

def tiny_calibration():
    # Deliberately unrepresentative: images at 1/50 of their range. Static int8 then fixes
    # activation ranges far too small and saturates on real inputs.
    x, _, order = _split()
    return x[order[:200]] / 50.0, None
'''

SPEC = '''
[bundle]
name = "digits-mlp"
version = "1.0.0"
release_counter = 1

[model]
factory = "recipe.py:model"
format = "sklearn"
output_names = ["label", "probabilities"]

[task]
kind = "classification"

[preprocessing]
input = "image"
output = "x"
steps = [
  {{ op = "scale", multiply = 0.0625 }},
  {{ op = "reshape", shape = [64] }},
  {{ op = "cast", dtype = "float32" }},
]

[calibration]
factory = "recipe.py:{calibration}"

[evaluation]
factory = "recipe.py:evaluation"
metric = "accuracy"
output = "probabilities"
budget = {budget}

[variants]
build = {variants}

[targets]
profiles = ["x86-kiosk"]

[signing]
keys = "keys"
create = true

[output]
dir = "out"
latency_runs = 10
'''


def write_project(root: Path, *, variants: str = '["onnx-fp32", "onnx-int8"]', budget: float = 0.01,
                  calibration: str = "calibration", extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.py").write_text(RECIPE)
    spec = SPEC.format(variants=variants, budget=budget, calibration=calibration) + textwrap.dedent(extra)
    (root / "edgepack.toml").write_text(spec)
    return root / "edgepack.toml"


@pytest.fixture
def mlp_project(tmp_path: Path) -> Callable[..., Path]:
    """Write a digits-MLP project; returns the path of its edgepack.toml."""

    def make(**kwargs: Any) -> Path:
        return write_project(tmp_path / "project", **kwargs)

    return make


@pytest.fixture
def quiet_console() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), width=150)


def run_build(spec_path: Path, console: Any, overrides: dict[str, Any] | None = None, **kwargs: Any
              ) -> dict[str, Any]:
    from converter import build, load_spec

    return build(load_spec(spec_path, overrides), console=console, **kwargs)


def variant(report: dict[str, Any], vid: str) -> dict[str, Any]:
    return next(v for v in report["variants"] if v["id"] == vid)


KERAS_UNCONVERTIBLE_RECIPE = '''
import numpy as np

def _split():
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    return d.images.astype(np.float32), d.target.astype(np.int64), order

def model():
    # A Lambda layer with Bucketize (tf2onnx has no ONNX equivalent) and sin (TFLite has no int8 kernel).
    from converter.sources import prepare_tensorflow
    tf = prepare_tensorflow()
    import keras
    keras.utils.set_random_seed(0)
    x, y, order = _split()
    def odd(t):
        return tf.math.sin(t) + tf.cast(tf.raw_ops.Bucketize(input=t, boundaries=[0.5]), tf.float32)
    m = keras.Sequential([keras.Input((64,), name="x"), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Lambda(odd),
                          keras.layers.Dense(10, activation="softmax")])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(x[order[:1200]].reshape(-1, 64) / 16.0, y[order[:1200]], epochs=3, verbose=0)
    return m

def calibration():
    x, _, order = _split()
    return x[order[:100]], None

def evaluation():
    x, y, order = _split()
    return x[order[1200:]], y[order[1200:]]
'''
