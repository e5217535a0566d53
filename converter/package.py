"""Turn the evaluated variants into bundle files and a manifest dict.

Determinism: everything here is a function of the inputs and package versions. Host figures
(latency, memory, build time) go to ``measurements.json``, which the content digest excludes;
JSON is written with sorted keys; floats are rounded so the text does not depend on repr noise.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.spec import BuildSpec

PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxconverter-common", "tensorflow-cpu", "keras", "ai-edge-litert",
            "torch", "transformers", "scikit-learn", "skl2onnx", "tokenizers")
RUNTIME_OF = {"onnx": "onnxruntime", "tflite": "litert"}
MIN_RUNTIME = {"onnxruntime": ">=1.16", "litert": ">=1.0"}
# Tolerances for a device re-running the golden features: other CPUs use other kernels (ARM NEON vs
# x86 AVX, other int8 accumulation orders), so the budget grows with the precision's own rounding.
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (5e-3, 1e-2), "int8": (5e-2, 5e-2)}


@dataclass
class VariantResult:
    """One variant through the build: its bytes, metric, measurements and fate."""

    id: str
    format: str
    precision: str
    prefix: str = ""
    """``""`` for the input model's variants, ``pruned`` / ``student`` for a stage's."""
    main_gate: bool = False
    """Passed the build's own gate ([evaluation]), not only a stage's looser one: may ship automatically."""
    data: bytes | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    delta: float | None = None
    drop: float | None = None
    passed: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    build_seconds: float = 0.0
    error: dict[str, Any] | None = None
    outputs: list[np.ndarray] | None = None

    @property
    def runtime(self) -> str:
        return RUNTIME_OF[self.format]

    @property
    def file(self) -> str:
        return f"models/model.{self.id}.{'onnx' if self.format == 'onnx' else 'tflite'}"


def r6(x: float) -> float:
    """Round to 6 significant digits: stable JSON text."""
    return float(f"{x:.6g}")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def edgepack_version() -> str:
    try:
        return importlib.metadata.version("edgepack")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def reference_stats(features: dict[str, np.ndarray], ref_out: np.ndarray, task: str,
                    metric: dict[str, Any], *, first_input: str | None = None,
                    output_name: str = "output") -> dict[str, Any]:
    """What the fp32 model saw and said on the evaluation set: the baseline for drift telemetry.

    ``drift`` is the profile devices count their inputs against (bundles/drift.py): the first model input's
    values (or token lengths for text), and the embedding norm for embedding models.
    """
    from bundles.drift import build_profile

    stats: dict[str, Any] = {"features": {}, "metric": metric, "samples": len(ref_out)}
    first = first_input if first_input in features else next(iter(sorted(features)), None)
    if first is not None:
        stats["drift"] = build_profile(features, {output_name: ref_out}, first_input=first, task=task).to_dict()
    for name, arr in sorted(features.items()):
        a = arr.astype(np.float64)
        stats["features"][name] = {"mean": r6(a.mean()), "std": r6(a.std()), "min": r6(a.min()),
                                   "max": r6(a.max()), "shape": list(arr.shape[1:]), "dtype": str(arr.dtype)}
    out = ref_out.reshape(len(ref_out), -1).astype(np.float64)
    if task == "classification":
        counts = np.bincount(np.argmax(out, axis=1), minlength=out.shape[1])
        stats["outputs"] = {"class_distribution": [r6(c / len(out)) for c in counts],
                            "mean_top_score": r6(float(np.max(out, axis=1).mean()))}
    elif task == "embedding":
        stats["outputs"] = {"mean_norm": r6(float(np.linalg.norm(out, axis=1).mean())), "dim": int(out.shape[1])}
    else:
        stats["outputs"] = {"mean": r6(float(out.mean())), "std": r6(float(out.std()))}
    return stats


def _tensor(t: tuple[str, str, list[int | str]]) -> dict[str, Any]:
    name, dtype, dims = t
    return {"name": name, "dtype": dtype, "shape": [None if d in ("?", 0) else d for d in dims]}


def build_manifest(spec: BuildSpec, shipped: list[VariantResult], profiles: dict[str, list[str]],
                   inputs: list[tuple[str, str, list[int | str]]], outputs: list[tuple[str, str, list[int | str]]],
                   golden_tol: dict[str, dict[str, float]], features_atol: float, input_sha: str,
                   spec_sha: str) -> dict[str, Any]:
    """The manifest dict handed to ``bundles.assemble.assemble_bundle``."""
    hw = sorted({h for p in spec.profiles for h in p.hardware_ids})
    platforms = sorted({pl for p in spec.profiles for pl in p.platforms})
    runtimes = sorted({v.runtime for v in shipped})
    return {
        "format_version": 1,
        "name": spec.name,
        "version": spec.version,
        "release_counter": spec.release_counter,
        "hardware_ids": hw,
        "compatibility": {"platforms": platforms, "runtimes": {r: _min_runtime(r, shipped) for r in runtimes},
                          "min_agent_version": "0.1.0"},
        "io": {"inputs": [_tensor(t) for t in inputs], "outputs": [_tensor(t) for t in outputs],
               "labels": list(spec.labels) if spec.labels else None, "task": spec.task},
        "preprocessing": "preprocessing.json",
        "golden": {"file": "golden.npz", "features_atol": features_atol, "variants": golden_tol},
        "reference_stats": "reference_stats.json",
        "variants": [
            {"id": v.id, "file": v.file, "format": v.format, "runtime": v.runtime, "precision": v.precision,
             "quantization": v.quantization,
             "metric": {"name": spec.metric, "value": r6(v.value or 0.0), "delta": r6(v.delta or 0.0),
                        "budget": spec.budget, "checks": {c["name"]: c["value"] for c in v.checks}},
             "size_bytes": len(v.data or b"")}
            for v in shipped
        ],
        "profiles": profiles,
        "provenance": {"edgepack_version": edgepack_version(), "packages": package_versions(),
                       "input_model_sha256": input_sha, "build_spec_sha256": spec_sha},
    }


def _min_runtime(runtime: str, shipped: list[VariantResult]) -> str:
    """8-bit ``MatMulNBits`` (weight-only nodes) has CPU kernels since onnxruntime 1.22 (PR #24491)."""
    if runtime == "onnxruntime" and any(v.quantization.get("weight_only_nodes") for v in shipped):
        return ">=1.22"
    return MIN_RUNTIME[runtime]


def golden_tolerances(shipped: list[VariantResult], golden_outputs: dict[str, list[np.ndarray]]
                      ) -> dict[str, dict[str, float]]:
    """atol scales with the output's magnitude (probabilities ~1, logits or regressions larger)."""
    tol = {}
    for v in shipped:
        scale = max(1.0, max(float(np.max(np.abs(o))) for o in golden_outputs[v.id]))
        atol, rtol = TOLERANCE[v.precision]
        tol[v.id] = {"atol": r6(atol * scale), "rtol": rtol}
    return tol


def dumps(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
