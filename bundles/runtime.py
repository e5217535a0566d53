"""Run a model variant with whichever runtime is installed: onnxruntime, ai-edge-litert, tflite-runtime.

Runtimes are imported lazily, inside the functions, so importing this module costs nothing and a device
only needs the runtime its bundle's variant uses. LiteRT is preferred over tflite-runtime (which stopped at
2.14 and breaks under NumPy 2); tflite-runtime is only a fallback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bundles.errors import BundleError, UnsupportedError


class RuntimeError_(BundleError):
    """A runtime failed to load a model or to run it (bad input, broken model)."""


class Runner(Protocol):
    runtime: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    """Runtime family as named in manifests: ``onnxruntime`` or ``litert``."""
    package: str
    version: str


def available_runtimes() -> dict[str, RuntimeInfo]:
    """Installed runtimes by family, without importing them (importlib metadata only)."""
    from importlib import metadata

    found: dict[str, RuntimeInfo] = {}
    for family, packages in (("onnxruntime", ("onnxruntime",)), ("litert", ("ai-edge-litert", "tflite-runtime"))):
        for pkg in packages:
            module = pkg.replace("-", "_")
            if importlib.util.find_spec(module) is None:
                continue
            try:
                found[family] = RuntimeInfo(family, pkg, metadata.version(pkg))
            except metadata.PackageNotFoundError:
                found[family] = RuntimeInfo(family, pkg, "unknown")
            break
    return found


class OnnxRunner:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeError_(f"onnxruntime cannot load the model: {exc}", path=str(path)) from exc
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = tuple(self.inputs)
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            out = self.session.run(None, {k: feeds[k] for k in self.input_names})
        except KeyError as exc:
            raise RuntimeError_("missing model input", expected=list(self.input_names),
                                found=sorted(feeds)) from exc
        except Exception as exc:
            raise RuntimeError_(f"onnxruntime failed to run: {exc}") from exc
        return dict(zip(self.output_names, out, strict=True))


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError as exc:
        raise UnsupportedError("no LiteRT runtime installed: pip install ai-edge-litert "
                               "(or tflite-runtime with numpy<2)") from exc


class LiteRTRunner:
    """Runs .tflite models; quantizes/dequantizes int8 inputs and outputs transparently."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1) -> None:
        interpreter_cls = _litert_interpreter()
        try:
            self.interp = interpreter_cls(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeError_(f"LiteRT cannot load the model: {exc}", path=str(path)) from exc
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.input_names = tuple(d["name"] for d in self._in)
        self.output_names = tuple(d["name"] for d in self._out)
        self._batch = {d["name"]: int(d["shape"][0]) if len(d["shape"]) else 1 for d in self._in}

    def _one(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for d in self._in:
            x = np.asarray(feeds[d["name"]])
            if x.shape != tuple(d["shape"]):
                self.interp.resize_tensor_input(d["index"], list(x.shape))
                self.interp.allocate_tensors()
            scale, zero = d.get("quantization", (0.0, 0))
            if d["dtype"] in (np.int8, np.uint8) and scale:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max)
            self.interp.set_tensor(d["index"], x.astype(d["dtype"]))
        self.interp.invoke()
        outs = []
        for d in self._out:
            y = self.interp.get_tensor(d["index"])
            scale, zero = d.get("quantization", (0.0, 0))
            if d["dtype"] in (np.int8, np.uint8) and scale:
                y = (y.astype(np.float32) - zero) * scale
            outs.append(np.array(y))
        return outs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise RuntimeError_("missing model input", expected=list(self.input_names), found=sorted(feeds))
            return dict(zip(self.output_names, self._one(feeds), strict=True))
        except RuntimeError_:
            raise
        except Exception as exc:
            raise RuntimeError_(f"LiteRT failed to run: {exc}") from exc


def load_runner(path: Path, runtime: str, threads: int = 1) -> Runner:
    """Open a model file with the named runtime family (``onnxruntime`` or ``litert``)."""
    if runtime == "onnxruntime":
        return OnnxRunner(path, threads)
    if runtime == "litert":
        return LiteRTRunner(path, threads)
    raise UnsupportedError("unknown runtime", expected="onnxruntime|litert", found=runtime)
