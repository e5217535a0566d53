"""Calibration and evaluation data: load raw samples, run the bundle's preprocessing, check fit.

Raw data comes from a file (``.npz`` with ``raw_key``/``label_key`` arrays, ``.npy``, ``.txt``
with one text sample a line, ``.jsonl`` with one object a line) or from a Python factory
returning ``(raw, labels)``. The *same* :class:`bundles.preprocessing.Pipeline` that ships in
the bundle turns raw samples into model features here, so the device and the build cannot
disagree about preprocessing. Shape and dtype are checked against the model's inputs before
any runtime sees them, so a mismatch is reported as a data error with a fix, not as a
runtime stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.errors import CalibrationDataError, DataError, EvaluationDataError, SpecError
from converter.sources import load_callable
from converter.spec import BuildSpec, DataSpec

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


@dataclass(frozen=True)
class Dataset:
    """Raw samples, their labels (or None) and the features the pipeline made from them."""

    raw: np.ndarray
    labels: np.ndarray | None
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.raw.shape[0])


def load_raw(ds: DataSpec, spec: BuildSpec, err: type[DataError]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read raw samples and labels; the error class says which data set is at fault."""
    labels: Any = None
    if ds.factory:
        result = load_callable(ds.factory, spec.root)()
        if isinstance(result, dict):
            raw, labels = result.get(ds.raw_key), result.get(ds.label_key or "")
        elif isinstance(result, tuple):
            raw, labels = result[0], (result[1] if len(result) > 1 else None)
        else:
            raw = result
    else:
        assert ds.path is not None
        if not ds.path.is_file():
            raise err(f"data file {str(ds.path)!r} does not exist", fix="check the path in edgepack.toml")
        suffix = ds.path.suffix
        if suffix == ".npz":
            with np.load(ds.path, allow_pickle=False) as z:
                if ds.raw_key not in z:
                    raise err(f"{ds.path.name} has no array {ds.raw_key!r} (has {sorted(z.files)})",
                              fix="set raw_key to one of those names")
                raw = z[ds.raw_key]
                labels = z[ds.label_key] if ds.label_key and ds.label_key in z else None
        elif suffix == ".npy":
            raw = np.load(ds.path, allow_pickle=False)
        elif suffix == ".txt":
            raw = [ln.strip() for ln in ds.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        elif suffix == ".jsonl":
            rows = [json.loads(ln) for ln in ds.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            raw = [r[ds.raw_key] for r in rows]
            if ds.label_key and rows and all(ds.label_key in r for r in rows):
                labels = [r[ds.label_key] for r in rows]
        else:
            raise err(f"unsupported data file type {suffix!r}", fix="use .npz, .npy, .txt or .jsonl")
    if raw is None:
        raise err(f"no raw samples under key {ds.raw_key!r}")
    raw_arr = np.asarray(raw)
    if raw_arr.dtype.kind == "O":
        raise err("raw samples must be numbers or strings, found Python objects",
                  fix="return a numeric array or a list of str")
    lab = None if labels is None else np.asarray(labels)
    if ds.limit is not None:
        raw_arr = raw_arr[: ds.limit]
        lab = None if lab is None else lab[: ds.limit]
    if raw_arr.ndim == 0 or raw_arr.shape[0] == 0:
        raise err("the data set is empty (0 samples)",
                  fix="point the data source at a non-empty file; the build needs samples to measure accuracy")
    if lab is not None and lab.shape[0] != raw_arr.shape[0]:
        raise err(f"{raw_arr.shape[0]} samples but {lab.shape[0]} labels", fix="give one label per sample")
    return raw_arr, lab


def make_pipeline(spec: BuildSpec) -> Any:
    """Build the preprocessing pipeline from ``[preprocessing]`` and its resource files."""
    from bundles.errors import BundleError
    from bundles.preprocessing import Pipeline

    resources: dict[str, bytes] = {}
    for name, path in spec.preprocessing_resources.items():
        if not path.is_file():
            raise SpecError(f"preprocessing resource {name!r} not found at {str(path)!r}",
                            fix="fix the path under [preprocessing.resources]")
        resources[name] = path.read_bytes()
    try:
        return Pipeline.from_dict(library_spec(spec.preprocessing, resources), resources)
    except BundleError as exc:
        raise SpecError(f"[preprocessing] is invalid: {exc}", step="preprocessing",
                        fix="see docs for the preprocessing ops and their arguments") from exc


def needs_fit(pipeline: Any) -> list[str]:
    """Names of the pipeline's ops that still have parameters to learn from data (e.g. standard_scale)."""
    return [f"{step.name} (steps[{i}])" for i, step in enumerate(pipeline.steps) if not step.fitted]


def library_spec(table: dict[str, Any], resources: dict[str, bytes]) -> dict[str, Any]:
    """Translate the friendly TOML form into the preprocessing library's spec.

    TOML: ``input = "image"``, ``output = "x"``, ``steps = [{op = "scale", multiply = 0.0625}, ...]``.
    Library: ``{"opset", "input": {"kind"}, "steps": [{"op", "version", "params"}], "output"}``.
    A step already in library form (it has ``params``) passes through. The newest registered
    version of each op is used; the tokenize op's resource digest is filled in from the file.
    """
    import hashlib

    from bundles.preprocessing import OPSET_VERSION, registered_ops

    known = registered_ops()
    steps = []
    for i, step in enumerate(table.get("steps", [])):
        if not isinstance(step, dict) or "op" not in step:
            raise SpecError(f"[preprocessing] steps[{i}] must be a table with an `op` key")
        if "params" in step:
            steps.append(dict(step))
            continue
        name = str(step["op"])
        if name not in known:
            raise SpecError(f"[preprocessing] steps[{i}]: unknown op {name!r}; known: {sorted(known)}")
        params = {k: v for k, v in step.items() if k != "op"}
        if name == "tokenize" and "sha256" not in params:
            res = str(params.get("resource", "tokenizer.json"))
            if res not in resources:
                raise SpecError(f"[preprocessing] tokenize needs resource {res!r}",
                                fix=f'add "{res}" = "path/to/tokenizer.json" under [preprocessing.resources]')
            params["sha256"] = hashlib.sha256(resources[res]).hexdigest()
        steps.append({"op": name, "version": max(known[name]), "params": params})
    kind = table.get("input", "image")
    return {"opset": table.get("opset", OPSET_VERSION),
            "input": kind if isinstance(kind, dict) else {"kind": kind},
            "steps": steps, "output": table.get("output", "input")}


def transform(pipeline: Any, raw: np.ndarray, err: type[DataError]) -> dict[str, np.ndarray]:
    """Run the pipeline; its refusals become data errors naming the data set."""
    from bundles.errors import BundleError

    batch: Any = [str(t) for t in raw] if raw.dtype.kind == "U" else raw
    try:
        return dict(pipeline.transform(batch))
    except BundleError as exc:
        raise err(f"preprocessing refused the raw data: {exc}",
                  fix="make the raw data match what [preprocessing] expects (shape, dtype, text)") from exc


def model_inputs(onnx_bytes: bytes) -> list[tuple[str, str, list[int | str]]]:
    """(name, dtype, shape) of each graph input that is not an initializer."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in t.shape.dim]
        out.append((vi.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def check_features(features: dict[str, np.ndarray], inputs: list[tuple[str, str, list[int | str]]],
                   err: type[DataError], what: str) -> None:
    """Refuse features that do not fit the model's inputs, saying exactly which and how."""
    for name, dtype, dims in inputs:
        if name not in features:
            raise err(f"the model needs input {name!r} but preprocessing produces {sorted(features)}",
                      fix="name the preprocessing output after the model input (or the other way round)")
        arr = features[name]
        shape_ok = arr.ndim == len(dims) and all(
            not isinstance(d, int) or d == 0 or d == s for d, s in zip(dims, arr.shape, strict=False))
        if not shape_ok:
            raise err(f"{what} feature {name!r} has shape {tuple(arr.shape)} but the model expects {dims}",
                      fix="add or fix a reshape/expand_dims step in [preprocessing] so the shapes agree")
        if str(arr.dtype) != dtype:
            raise err(f"{what} feature {name!r} has dtype {arr.dtype} but the model expects {dtype}",
                      fix=f"add a cast step to {dtype} at the end of [preprocessing]")


def load_dataset(spec: BuildSpec, pipeline: Any, which: str) -> Dataset:
    """Load the calibration or evaluation set through the pipeline."""
    err: type[DataError] = CalibrationDataError if which == "calibration" else EvaluationDataError
    ds = spec.calibration if which == "calibration" else spec.evaluation
    raw, labels = load_raw(ds, spec, err)
    return Dataset(raw=raw, labels=labels, features=transform(pipeline, raw, err))
