"""The second half of a build: measure, choose per profile, golden vectors, sign the bundle."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import BundleOutputError, ConverterError
from converter.measure import measure_interleaved, paired_ratio
from converter.package import (
    VariantResult,
    build_manifest,
    dumps,
    golden_tolerances,
    r6,
    reference_stats,
)
from converter.profiles import Candidate, decide
from converter.spec import BuildSpec


def _measure_all(spec: BuildSpec, results: list[VariantResult], ev: dict[str, np.ndarray], work: Path,
                 steps: Any) -> None:
    """Latency and memory of every built variant, in interleaved rounds (see converter.measure)."""
    built = [r for r in results if r.data is not None]
    sample = work / "sample.npz"
    np.savez(sample, **{k: v[:1] for k, v in ev.items()})  # type: ignore[arg-type]  # numpy stub: kwargs are arrays
    models = {}
    for r in built:
        path = work / f"measure-{r.id}.{r.format}"
        path.write_bytes(r.data or b"")
        models[r.id] = (r.format, path)
    with steps.step("measure latency + memory (interleaved rounds)"):
        figures, errors = measure_interleaved(models, sample, spec.latency_runs, spec.latency_rounds)
    for r in built:
        r.latency = figures.get(r.id)
        if r.id in errors:  # a measurement failure is reported, not fatal
            r.quantization = {**r.quantization, "measure_error": errors[r.id]}


def _variant_row(r: VariantResult, status: str, results: dict[str, VariantResult]) -> dict[str, Any]:
    fp32 = results.get(f"{r.format}-fp32")
    row: dict[str, Any] = {"id": r.id, "format": r.format, "runtime": r.runtime, "precision": r.precision,
                           "status": status, "value": r.value, "delta": r.delta, "drop": r.drop,
                           "checks": r.checks, "size_bytes": len(r.data) if r.data is not None else None,
                           "latency": r.latency, "quantization": r.quantization, "build_seconds": r.build_seconds,
                           "error": r.error}
    if r.data is not None:
        row["compressed_bytes"] = len(zlib.compress(r.data, 9))  # what a zip/deflate transfer would carry
    if fp32 is not None and fp32.data is not None and r.data is not None:
        row["smaller_x"] = round(len(fp32.data) / len(r.data), 3)
        ratio = paired_ratio(fp32.latency, r.latency)
        if ratio is not None:
            row["speedup_x"], row["speedup_range"] = ratio["x"], [ratio["min"], ratio["max"]]
    if r.prefix:
        row["stage"] = r.prefix
        row["main_gate"] = r.main_gate
        base = results.get(r.id[len(r.prefix) + 1:])  # the input model's variant of the same kind
        if base is not None and base.data is not None and r.data is not None:
            row["vs_base"] = {"variant": base.id, "smaller_x": round(len(base.data) / len(r.data), 3)}
            ratio = paired_ratio(base.latency, r.latency)
            if ratio is not None:
                row["vs_base"].update(speedup_x=ratio["x"], speedup_range=[ratio["min"], ratio["max"]])
    return row


def _measured_note(r: VariantResult, by_id: dict[str, VariantResult]) -> str | None:
    """The speed of ``r`` against fp32 of its format as this build measured it, for profile notes."""
    fp32 = by_id.get(f"{r.format}-fp32")
    ratio = paired_ratio(fp32.latency, r.latency) if fp32 is not None and fp32 is not r else None
    if ratio is None:
        return None
    return (f"{ratio['x']:.2f}x the speed of {r.format}-fp32 (per-round range {ratio['min']:.2f}-"
            f"{ratio['max']:.2f}x), which says nothing about the target's CPU")


def finish(spec: BuildSpec, report: dict[str, Any], results: list[VariantResult], pipeline: Any, loaded: Any,
           ev_raw: np.ndarray, ev: dict[str, np.ndarray], ref_outs: list[np.ndarray], out_names: list[str],
           work: Path, steps: Any, dry_run: bool, spec_sha: str, dump_dir: Path | None = None) -> None:
    """Measure, decide, write golden vectors and the bundle; fills ``report`` in place."""
    from converter.data import model_inputs
    from converter.runners import run_variant

    _measure_all(spec, results, ev, work, steps)
    by_id = {r.id: r for r in results}
    candidates = [Candidate(r.id, r.runtime, r.precision, r.main_gate and r.data is not None, len(r.data or b""),
                            (r.latency or {}).get("p50_ms"), _measured_note(r, by_id)) for r in results]
    decisions = {p.name: decide(p, candidates) for p in spec.profiles}
    report["profiles"] = {n: {"ship": list(d.ship), "excluded": d.excluded} for n, d in decisions.items()}
    order: list[str] = []
    for d in decisions.values():
        order += [v for v in d.ship if v not in order]
    for r in results:
        status = "failed" if r.data is None else "refused" if not r.passed else \
            "shipped" if r.id in order else "passed"
        report["variants"].append(_variant_row(r, status, by_id))
    if not order:
        raise ConverterError("no variant passed the accuracy gate and suits a target profile; nothing to ship",
                             step="profiles", fix="see the per-variant errors above")
    if spec.strict and any(r.error for r in results):
        raise ConverterError("strict build: some variants failed or were refused", step="profiles",
                             fix="fix them or drop them from [variants] build")
    shipped = [by_id[v] for v in order]

    with steps.step("golden vectors"):
        from bundles.golden import Golden

        n = min(spec.golden_count, len(ev_raw))
        raw = ev_raw[:n]
        feats = dict(pipeline.transform([str(t) for t in raw] if raw.dtype.kind == "U" else raw))
        g_out = {r.id: run_variant(r.format, r.data or b"", feats) for r in shipped}
        golden = Golden(raw=raw, features=feats,
                        outputs={vid: dict(zip(out_names, outs, strict=False)) for vid, outs in g_out.items()})
        features_atol = 0.0 if all(v.dtype.kind in "iub" for v in feats.values()) else 1e-5

    ref_model = loaded.onnx_bytes or b""
    if loaded.onnx_bytes is not None:
        inputs = model_inputs(ref_model)
        import onnx

        outputs = [(o.name, "float32", [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                        for d in o.type.tensor_type.shape.dim])
                   for o in onnx.load_from_string(ref_model).graph.output]
    else:
        inputs = [(k, str(v.dtype), ["batch", *v.shape[1:]]) for k, v in ev.items()]
        outputs = [(nm, "float32", ["batch", *o.shape[1:]]) for nm, o in zip(out_names, ref_outs, strict=False)]
    manifest = build_manifest(spec, shipped, {n: list(d.ship) for n, d in decisions.items() if d.ship},
                              inputs, outputs, golden_tolerances(shipped, g_out), features_atol,
                              loaded.input_sha256, spec_sha)
    files: dict[str, bytes] = {r.file: r.data or b"" for r in shipped}
    files["preprocessing.json"] = dumps(pipeline.to_dict())
    files.update(pipeline.resources())
    files["golden.npz"] = golden.to_bytes()
    files["reference_stats.json"] = dumps(reference_stats(ev, ref_outs[out_names.index(report["metric"]["output"])],
                                                          spec.task, report["metric"], first_input=inputs[0][0],
                                                          output_name=report["metric"]["output"]))
    files["measurements.json"] = dumps({"host": _host(), "timings_s": report["timings"],
                                        "variants": {r.id: r.latency for r in results if r.latency}})
    report["manifest"] = manifest
    if dump_dir is not None:
        for rel, data in [*files.items(), ("manifest.json", dumps(manifest))]:
            (dump_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (dump_dir / rel).write_bytes(data)
    if dry_run:
        return
    with steps.step("sign + assemble bundle"):
        report["bundle"] = _assemble(spec, manifest, files)


def _host() -> dict[str, Any]:
    import os
    import platform

    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


def _assemble(spec: BuildSpec, manifest: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    from bundles.assemble import assemble_bundle
    from bundles.errors import BundleError
    from bundles.keys import KeyStore

    if spec.keys_dir is None:
        raise BundleOutputError("no signing keys configured", fix="set [signing] keys = \"DIR\" (create it with "
                                "`edgepack keys init --out DIR`) or pass --keys DIR; --dry-run skips signing")
    try:
        if not (spec.keys_dir / "trust" / "root.json").is_file() and spec.create_keys:
            KeyStore.init(spec.keys_dir)
        keystore = KeyStore.load(spec.keys_dir)
        out = spec.out_dir / f"{spec.name}-{spec.version}.edgepack"
        info = assemble_bundle(out, keystore=keystore, manifest=manifest, files=files,
                               expires_days=spec.expires_days)
    except BundleError as exc:
        raise BundleOutputError(str(exc), fix="bump [bundle] version and release_counter (--version, "
                                "--release-counter) for new content, or fix the key directory it names") from exc
    return {"path": str(info.path), "content_digest": info.content_digest, "size_bytes": info.path.stat().st_size,
            "targets_version": info.targets_version, "files": sorted([*files, "manifest.json"])}


__all__ = ["finish", "r6"]
