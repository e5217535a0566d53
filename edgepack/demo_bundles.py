"""The demo's bundles: the digits CNN built by the converter, and releases derived from it.

``derive_bundle`` re-signs a verified bundle's preprocessing and its ONNX fp32 model as a new version,
optionally changing the model first. Two deliberate faults come from it:

* :func:`confuse_classes` swaps output classes of the last layer: a valid model, 30-40 points less accurate;
* :func:`add_memory_bomb` adds a branch whose tensor size depends on the input and cannot be allocated: the
  runtime fails to allocate on every request, the worker treats that as running out of memory and dies, as it
  would under the kernel's OOM killer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bundles.assemble import BundleInfo, assemble_bundle
from bundles.golden import Golden
from bundles.keys import KeyStore
from bundles.selftest import load_golden
from bundles.verify import MEASUREMENTS, VerifiedBundle

FP32 = "onnx-fp32"


def build_digits(*, keys_dir: Path, out_dir: Path, profiles: list[str], console: Any = None) -> Path:
    """Build examples/digits with the converter, signing with ``keys_dir``; returns the bundle path."""
    from converter.builder import build
    from converter.spec import load_spec

    spec_path = Path(__file__).resolve().parents[1] / "examples" / "digits" / "edgepack.toml"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: run the demo from a clone of the edgepack repository")
    spec = load_spec(spec_path, {"signing": {"keys": str(keys_dir), "create": False},
                                 "output": {"dir": str(out_dir)}, "targets": {"profiles": profiles},
                                 "variants": {"build": ["onnx-fp32", "onnx-int8"]}})
    report = build(spec, console=console)
    if report["status"] != "ok" or not report.get("bundle"):
        raise RuntimeError(f"the digits build failed: {report.get('errors')}")
    bundle = report["bundle"]
    return Path(bundle["path"] if isinstance(bundle, dict) else bundle)


def confuse_classes(model: bytes) -> bytes:
    """Swap classes 1<->7, 3<->8 and 4<->9 in the last layer: the model stays valid but is much worse."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    inits = {i.name: i for i in proto.graph.initializer}
    swaps = [(1, 7), (3, 8), (4, 9)]
    changed = 0
    for node in reversed(proto.graph.node):
        for name in node.input:
            init = inits.get(name)
            if init is None:
                continue
            arr = numpy_helper.to_array(init).copy()
            axis = next((a for a, n in enumerate(arr.shape) if n == 10), None)
            if axis is None:
                continue
            for a, b in swaps:
                idx: list[slice | int] = [slice(None)] * arr.ndim
                ia, ib = list(idx), list(idx)
                ia[axis], ib[axis] = a, b
                arr[tuple(ia)], arr[tuple(ib)] = arr[tuple(ib)].copy(), arr[tuple(ia)].copy()
            init.CopyFrom(numpy_helper.from_array(arr, name))
            changed += 1
        if changed:
            break
    if not changed:
        raise ValueError("no 10-class weight found in the last layer")
    return bytes(proto.SerializeToString())


def add_memory_bomb(model: bytes) -> bytes:
    """Add ``out += 0 * sum(expand(sum(x), [2**40]))``: impossible to allocate, and not constant-foldable."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load_from_string(model)
    graph = proto.graph
    x = graph.input[0].name
    floats = [o.name for o in graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not floats:
        raise ValueError("the model has no float output to attach the memory bomb to")
    out = floats[0]
    raw_out = out + "__before_bomb"
    for node in graph.node:
        node.output[:] = [raw_out if o == out else o for o in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([2**40], dtype=np.int64), "bomb_shape"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "bomb_zero"),
    ])
    graph.node.extend([
        helper.make_node("ReduceSum", [x], ["bomb_seed"], keepdims=0),
        helper.make_node("Expand", ["bomb_seed", "bomb_shape"], ["bomb_big"]),
        helper.make_node("ReduceSum", ["bomb_big"], ["bomb_sum"], keepdims=0),
        helper.make_node("Mul", ["bomb_sum", "bomb_zero"], ["bomb_nothing"]),
        helper.make_node("Add", [raw_out, "bomb_nothing"], [out]),
    ])
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def derive_bundle(base: VerifiedBundle, keystore: KeyStore, out: Path, *, version: str, release_counter: int,
                  transform: Callable[[bytes], bytes] | None = None, golden_from_base: bool = False,
                  note: str = "") -> BundleInfo:
    """Sign ``base``'s preprocessing and ONNX fp32 model (optionally transformed) as a new version.

    Golden outputs are recomputed with onnxruntime on the new model, unless ``golden_from_base``: then the
    base model's outputs are kept (for a model that cannot run at all, like the memory bomb).
    """
    import onnxruntime as ort

    manifest = base.manifest.to_dict()
    variant = dict(next(v for v in manifest["variants"] if v["id"] == FP32))
    model = base.path(variant["file"]).read_bytes()
    if transform is not None:
        model = transform(model)
    golden = load_golden(base)
    outputs = dict(golden.outputs[FP32])
    if not golden_from_base:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {i.name: golden.features[i.name] for i in session.get_inputs()})
        outputs = dict(zip(names, values, strict=True))
    new_golden = Golden(raw=golden.raw, features=golden.features, outputs={FP32: outputs})
    variant.update(size_bytes=len(model))
    if note:
        variant["note"] = note
    manifest.update(version=version, release_counter=release_counter, variants=[variant],
                    profiles={hw: [FP32] for hw in manifest.get("profiles", {})})
    manifest["golden"] = {**manifest["golden"], "variants": {FP32: manifest["golden"].get("variants", {}).get(
        FP32, {"atol": 1e-4, "rtol": 1e-3})}}
    skip = {"manifest.json", MEASUREMENTS, manifest["golden"]["file"]}
    skip |= {v.file for v in base.manifest.variants}
    files: dict[str, bytes | Path] = {rel: base.path(rel) for rel in base.files if rel not in skip}
    files[variant["file"]] = model
    files[manifest["golden"]["file"]] = new_golden.to_bytes()
    return assemble_bundle(out, keystore=keystore, manifest=manifest, files=files)


def describe(info: BundleInfo) -> str:
    return json.dumps({"name": info.name, "version": info.version, "release_counter": info.release_counter})
