"""Load the input model and turn it into the fp32 ONNX reference every variant starts from.

Inputs: an ``.onnx`` file; a Keras ``.keras`` file (exported with Keras' own
``model.export(format="onnx")``, tf2onnx underneath: ADR 0003) or TF SavedModel (TFLite variants are
converted from these directly); a PyTorch ``nn.Module`` from a factory (exported with the
TorchScript-based ``torch.onnx.export``, which needs no onnxscript); a scikit-learn estimator
from a factory (skl2onnx). Heavy libraries are imported inside the functions that need them.
Every translation is checked against the framework's own outputs before it is trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError, ModelInputError, SpecError
from converter.spec import BuildSpec


@dataclass
class LoadedModel:
    """The input model, ready for the variant builders."""

    kind: str
    onnx_bytes: bytes | None
    input_sha256: str
    keras_model: Any = None
    saved_model_dir: Path | None = None
    onnx_error: ModelInputError | None = None
    torch_module: Any = None
    notes: list[str] = field(default_factory=list)


def load_callable(ref: str, root: Path) -> Any:
    """Import ``"file.py:function"`` (relative to the spec directory) and return the function."""
    file_part, sep, func = ref.partition(":")
    if not sep or not func:
        raise SpecError(f"factory {ref!r} must look like \"file.py:function\"")
    path = (root / file_part).resolve()
    if not path.is_file():
        raise SpecError(f"factory file {str(path)!r} not found", fix="check the path relative to edgepack.toml")
    mod_name = f"_edgepack_factory_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    fn = getattr(sys.modules[mod_name], func, None)
    if not callable(fn):
        raise SpecError(f"{path.name} has no function {func!r}", fix=f"define def {func}(): ... in {path.name}")
    return fn


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _detect(obj: Any, path: Path | None) -> str:
    if path is not None:
        if path.suffix == ".onnx":
            return "onnx"
        if path.suffix in (".keras", ".h5"):
            return "keras"
        if path.is_dir() and (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ModelInputError(f"cannot tell the format of {str(path)!r}",
                              fix='set [model] format = "onnx" | "keras" | "savedmodel"')
    module = type(obj).__module__
    if module.startswith(("keras", "tf_keras", "tensorflow")):
        return "keras"
    if module.startswith("torch") or any(c.__module__.startswith("torch") for c in type(obj).__mro__):
        return "torch"
    if module.startswith("sklearn") or (hasattr(obj, "predict") and hasattr(obj, "get_params")):
        return "sklearn"
    raise ModelInputError(f"the model factory returned a {type(obj).__name__}, which edgepack cannot load",
                          fix="return a keras.Model, a torch.nn.Module, a scikit-learn estimator or a Path")


def prepare_tensorflow() -> Any:
    """Import TensorFlow quietly and deterministically (oneDNN's reorderings off, op determinism on)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    return tf


def load_model(spec: BuildSpec, features: dict[str, np.ndarray]) -> LoadedModel:
    """Load ``[model]`` and produce the fp32 ONNX reference (or record why there is none)."""
    m = spec.model
    obj: Any = None
    path = m.path
    if m.factory:
        obj = load_callable(m.factory, spec.root)()
        if isinstance(obj, (str, Path)):
            path, obj = Path(obj), None
    if path is not None and not path.exists():
        raise ModelInputError(f"model file {str(path)!r} does not exist", fix="check [model] path")
    kind = m.format if m.format != "auto" else _detect(obj, path)
    names = list(features)
    out_names = list(m.output_names or ["output"])
    try:
        if kind == "onnx":
            assert path is not None
            data = path.read_bytes()
            return LoadedModel(kind, data, hashlib.sha256(data).hexdigest())
        if kind == "keras":
            return _from_keras(obj, path, names, out_names, m.opset, features)
        if kind == "savedmodel":
            assert path is not None
            err = ModelInputError("a TF SavedModel has no ONNX translation in edgepack (only TFLite variants)",
                                  fix="give a .keras file or an .onnx export to build the ONNX variants")
            return LoadedModel(kind, None, _sha256_path(path), saved_model_dir=path, onnx_error=err)
        if kind == "torch":
            return _from_torch(obj, names, out_names, m.opset, m.dynamic_axes, features)
        if kind == "sklearn":
            return _from_sklearn(obj, names, out_names, m.opset, features)
    except (ModelInputError, ConversionError, SpecError):
        raise
    except Exception as exc:  # foreign errors are translated once, here
        raise ModelInputError(f"loading the {kind} model failed: {type(exc).__name__}: {exc}",
                              fix="check that the model loads in its own framework") from exc
    raise ModelInputError(f"unknown model format {kind!r}")


def from_object(spec: BuildSpec, obj: Any, features: dict[str, np.ndarray]) -> LoadedModel:
    """Load a model object made during the build (a pruned model, a student) like ``[model]`` would be."""
    m = spec.model
    kind = _detect(obj, None)
    if kind == "keras":
        return _from_keras(obj, None, list(features), list(m.output_names or ["output"]), m.opset, features)
    if kind == "torch":
        return _from_torch(obj, list(features), list(m.output_names or ["output"]), m.opset, m.dynamic_axes,
                           features)
    raise ModelInputError(f"a build stage returned a {kind} model; stages make Keras or PyTorch models")


def _from_keras(obj: Any, path: Path | None, names: list[str], outs: list[str], opset: int,
                features: dict[str, np.ndarray]) -> LoadedModel:
    from converter.keras_export import keras_to_onnx

    prepare_tensorflow()
    import keras

    model = obj if obj is not None else keras.models.load_model(path)
    sha = _sha256_path(path) if path is not None else _keras_weights_sha(model)
    try:
        data = keras_to_onnx(model, input_names=names, output_names=outs, opset=opset)
    except ModelInputError as exc:
        return LoadedModel("keras", None, sha, keras_model=model, onnx_error=exc)
    check = {n: features[n][:64] for n in names}
    expected = model([check[n] for n in names] if len(names) > 1 else check[names[0]], training=False)
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    verify_against(data, check, np.asarray(expected), "keras")
    return LoadedModel("keras", data, sha, keras_model=model)


def _keras_weights_sha(model: Any) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _from_torch(module: Any, names: list[str], outs: list[str], opset: int,
                dynamic_axes: dict[str, tuple[int, ...]], features: dict[str, np.ndarray]) -> LoadedModel:
    try:
        import torch
    except ImportError as exc:
        raise ModelInputError("PyTorch is not installed", fix="pip install 'edgepack[torch]'") from exc
    module.eval()
    sample = tuple(torch.from_numpy(np.ascontiguousarray(features[n][:2])) for n in names)
    axes = {n: {i: f"{n}_d{i}" for i in dynamic_axes.get(n, (0,))} for n in [*names, *outs]}
    for n in outs:
        axes[n] = {i: f"{n}_d{i}" for i in dynamic_axes.get(n, (0,))}
    buf = io.BytesIO()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, sample, buf,  # type: ignore[arg-type]  # BytesIO is accepted at run time
                          input_names=names, output_names=outs, opset_version=opset,
                          dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        check = {n: features[n][:8] for n in names}
        expected = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in check.values()))
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    data = buf.getvalue()
    verify_against(data, check, expected.numpy(), "torch")
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return LoadedModel("torch", data, h.hexdigest(), torch_module=module)


def _from_sklearn(est: Any, names: list[str], outs: list[str], opset: int,
                  features: dict[str, np.ndarray]) -> LoadedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    width = getattr(est, "n_features_in_", None)
    if width is None:  # unfitted or exotic estimator: fall back to the features' width
        width = int(features[names[0]].shape[-1])
    proto = to_onnx(est, initial_types=[(names[0], FloatTensorType([None, int(width)]))],
                    target_opset={"": opset, "ai.onnx.ml": 3}, options={id(est): {"zipmap": False}})
    data = proto.SerializeToString()
    return LoadedModel("sklearn", data, hashlib.sha256(data).hexdigest())


def verify_against(onnx_bytes: bytes, feeds: dict[str, np.ndarray], expected: np.ndarray, source: str) -> None:
    """Raise ConversionError when the ONNX translation disagrees with the framework's output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
    if got.shape != expected.shape or err > 1e-4 * scale:
        raise ConversionError(
            f"the ONNX translation of the {source} model disagrees with {source} itself "
            f"(shape {got.shape} vs {expected.shape}, max |diff| {err:.3g})",
            step="load-model", variant="onnx-fp32",
            fix="report this model to edgepack; meanwhile export to ONNX yourself and give the .onnx",
        )
