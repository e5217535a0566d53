"""``edgepack build``: the steps from an ``edgepack.toml`` to a signed bundle and a report.

Order: preprocessing -> data -> model -> fp32 reference -> each variant (build, evaluate, gate)
-> measure -> profiles -> golden vectors -> bundle. Errors that concern one variant are caught
per variant and recorded (the other variants still build); errors that concern the whole build
stop it. All intermediate files live in a private work directory inside the output directory,
removed at the end whatever happens; the bundle itself is written by ``assemble_bundle``
through a temporary file and an atomic rename, so a failed build leaves no partial bundle.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from converter import metrics
from converter.data import check_features, load_raw, make_pipeline, model_inputs, transform
from converter.errors import (
    AccuracyBudgetError,
    BundleOutputError,
    CalibrationDataError,
    ConversionError,
    ConverterError,
    EvaluationDataError,
    FitDataError,
    ModelInputError,
    SpecError,
)
from converter.package import VariantResult, r6
from converter.report import fmt_delta, print_table, write_reports
from converter.sources import LoadedModel, load_model
from converter.spec import BuildSpec
from converter.stage_spec import PREFIXES, split_variant


class _Steps:
    """Progress display and per-step timings (a spinner and elapsed time on every step)."""

    def __init__(self, console: Any, timings: dict[str, float]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.timings = timings

    @contextmanager
    def step(self, name: str, total: int = 1) -> Iterator[Any]:
        task = self.progress.add_task(name, total=total)
        t0 = time.perf_counter()
        try:
            yield lambda: self.progress.advance(task)
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            self.progress.update(task, completed=total)


def _dataset_name(spec: BuildSpec) -> str:
    """How the report names the evaluation set: its declared name, else where it comes from."""
    ds = spec.evaluation
    where = f"factory {ds.factory}" if ds.factory else f"file {ds.path.name if ds.path else '?'}"
    return f"{spec.evaluation_name} ({where})" if spec.evaluation_name else where


def _batch(raw: np.ndarray) -> Any:
    return [str(t) for t in raw] if raw.dtype.kind == "U" else raw


def build(spec: BuildSpec, *, console: Any = None, dry_run: bool = False, spec_sha256: str = "",
          dump_dir: Path | None = None) -> dict[str, Any]:
    """Run a build; returns the report (also written to the output directory).

    ``dump_dir`` receives a plain copy of the bundle's files (for inspection and debugging).
    """
    from rich.console import Console

    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=240, soft_wrap=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"name": spec.name, "version": spec.version, "status": "running", "variants": [],
                              "errors": [], "profiles": {}, "bundle": None, "timings": {}}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edgepack-work-", dir=spec.out_dir))
    steps = _Steps(console, report["timings"])
    try:
        preflight(spec, dry_run=dry_run)
        with steps.progress:
            _run(spec, report, work, steps, dry_run, spec_sha256, dump_dir)
        if report["bundle"] is None and not dry_run:
            report["status"] = "failed"
        else:
            report["status"] = "ok"
    except ConverterError as exc:
        report["errors"].append(exc.to_dict())
        report["status"] = "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["wall_seconds"] = round(time.perf_counter() - t0, 2)
        write_reports(report, spec.out_dir)
    print_table(report, console)
    return report


def preflight(spec: BuildSpec, *, dry_run: bool = False) -> None:
    """Check, before the long steps, what can be checked cheaply: files, factories, fit data, signing keys.

    A wrong path or a missing key directory must not cost a whole build (conversion, quantization,
    evaluation and measurement) before it is reported.
    """
    from converter.data import make_pipeline, needs_fit

    def factory_file(ref: str | None, key: str, err: type[ConverterError]) -> None:
        if ref:
            file_part = (spec.root / ref.partition(":")[0]).resolve()
            if not file_part.is_file():
                raise err(f"[{key}] factory file {str(file_part)!r} not found",
                          fix=f"fix factory under [{key}] (a path relative to edgepack.toml, then :function)")

    if spec.model.path is not None and not spec.model.path.exists():
        raise ModelInputError(f"[model] path {str(spec.model.path)!r} does not exist",
                              fix="point [model] path at your model file (relative to edgepack.toml) or use --model")
    factory_file(spec.model.factory, "model", ModelInputError)
    data_sets = [("calibration", spec.calibration, CalibrationDataError),
                 ("evaluation", spec.evaluation, EvaluationDataError)]
    if spec.fit is not None:
        data_sets.append(("fit", spec.fit, FitDataError))
    for key, ds, err in data_sets:
        if ds.path is not None and not ds.path.is_file():
            raise err(f"[{key}] path {str(ds.path)!r} does not exist",
                      fix=f"fix path under [{key}] (relative to edgepack.toml)")
        factory_file(ds.factory, key, err)
    learning = needs_fit(make_pipeline(spec))
    if learning and spec.fit is None:
        raise SpecError(f"[preprocessing] {', '.join(learning)} learn their parameters from data, but there is no "
                        "[fit] data set", step="preprocessing",
                        fix='add a [fit] section with training data (path = "train.npz" or factory = '
                        '"recipe.py:train_data"); the calibration and evaluation sets are not for fitting')
    if dry_run:
        return
    _check_keys(spec)


def _check_keys(spec: BuildSpec) -> None:
    from bundles.assemble import already_signed_message
    from bundles.errors import BundleError
    from bundles.keys import KeyStore
    from bundles.verify import bundle_targets

    if spec.keys_dir is None:
        raise BundleOutputError("no signing keys configured", fix="set [signing] keys = \"DIR\" (create it with "
                                "`edgepack keys init --out DIR`) or pass --keys DIR; --dry-run skips signing")
    if not (spec.keys_dir / "trust" / "root.json").is_file():
        if spec.create_keys:
            return  # created when signing (examples only)
        raise BundleOutputError(
            f"no key directory at {str(spec.keys_dir)!r} ([signing] keys, relative to edgepack.toml)",
            fix=f"create it with `edgepack keys init --out {spec.keys_dir}`, or point [signing] keys (or --keys) "
            "at the key directory you already have")
    try:
        keystore = KeyStore.load(spec.keys_dir)
        summary = keystore.role_summary()["targets"]
        targets = keystore.targets().signed
    except (BundleError, OSError, ValueError) as exc:
        raise BundleOutputError(f"the key directory {str(spec.keys_dir)!r} is unusable: {exc}",
                                fix="point [signing] keys (or --keys) at a directory made by `edgepack keys init`"
                                ) from exc
    if len(summary["present_here"]) < summary["threshold"]:
        raise BundleOutputError(
            f"signing a bundle needs {summary['threshold']} targets key(s) but {str(spec.keys_dir)!r} has "
            f"{len(summary['present_here'])}", fix="sign on the workstation that holds the offline targets keys "
            "(private/), not with a copy of online/")
    if bundle_targets(targets, spec.name, spec.version):
        # Every build signs new bytes (measurements.json holds this host's timings), so a signed version can never
        # be built again: refused here, before the long steps, rather than when signing.
        raise BundleOutputError(already_signed_message(keystore, targets, spec.name, spec.version),
                                fix="set a new version and a higher release counter: --version X.Y.Z "
                                "--release-counter N, or [bundle] version / release_counter in edgepack.toml "
                                "(--dry-run builds and evaluates without signing)")


def choose_output(spec: BuildSpec, out_names: list[str], ref_outs: list[Any]) -> tuple[int, str]:
    """Which model output the metric reads, and why: ``[evaluation] output`` when set, else the one output
    that fits the task (a classifier exported by skl2onnx has ``label`` and ``probabilities``: the class
    scores are the 2-D float one). Ambiguity is an error naming the key, never a guess."""
    pairs = list(zip(out_names, ref_outs, strict=False))
    out_names = [n for n, _ in pairs]
    tensors = {n: o for n, o in pairs if isinstance(o, np.ndarray) and o.dtype.kind != "O"}
    shapes = {n: (f"{o.dtype}{list(o.shape)}" if n in tensors else "sequence of maps") for n, o in pairs}
    fix = f"set [evaluation] output to one of {out_names}"
    if spec.metric_output:
        if spec.metric_output not in out_names:
            raise EvaluationDataError(f"[evaluation] output {spec.metric_output!r} is not a model output {out_names}",
                                      fix="name one of the model's outputs")
        name = spec.metric_output
        if name not in tensors:
            raise EvaluationDataError(f"output {name!r} is a {shapes[name]}, not a tensor (scikit-learn's ZipMap?)",
                                      fix="export with skl2onnx option zipmap=False, or " + fix)
        return out_names.index(name), "[evaluation] output"
    if len(out_names) == 1:
        name = out_names[0]
        if name not in tensors:
            raise EvaluationDataError(f"the model's only output {name!r} is a {shapes[name]}, not a tensor",
                                      fix="export with skl2onnx option zipmap=False (class scores as a tensor)")
        return 0, "the model's only output"
    floats = [n for n, o in tensors.items() if o.dtype.kind == "f"]
    if spec.task == "classification":
        fits = [n for n in floats if tensors[n].ndim == 2 and tensors[n].shape[1] >= 2]
        want = "2-D float class scores"
    else:
        fits = floats
        want = "float values"
    if len(fits) == 1:
        others = ", ".join(f"{n} {shapes[n]}" for n in out_names if n != fits[0])
        return out_names.index(fits[0]), f"the only output with {want} (others: {others})"
    if not fits and len(tensors) < len(out_names):
        fix = ("export the model with skl2onnx's options={'zipmap': False}, which gives the class scores as a "
               "tensor, then " + fix)
    raise EvaluationDataError(
        f"the model has {len(out_names)} outputs ({', '.join(f'{n} {shapes[n]}' for n in out_names)}) and "
        f"{'none' if not fits else len(fits)} of them hold {want}: which one should the {spec.metric} read?",
        fix=fix)


def _check_labels(spec: BuildSpec, name: str, out: np.ndarray) -> None:
    if spec.labels is None or spec.task != "classification" or out.ndim != 2:
        return
    if out.shape[1] != len(spec.labels):
        raise SpecError(f"[task] labels names {len(spec.labels)} classes but the model's output {name!r} has "
                        f"{out.shape[1]}", step="evaluate",
                        fix=f"list exactly {out.shape[1]} class names, in output order, in [task] labels")


def _fit(spec: BuildSpec, pipeline: Any, report: dict[str, Any]) -> Any:
    """Fit the preprocessing's learning ops on ``[fit]`` (training data); the report says on what."""
    from converter.data import needs_fit

    learning = needs_fit(pipeline)
    info: dict[str, Any] = {"learned": learning, "fitted_on": None}
    if spec.fit is not None:
        fit_raw, _ = load_raw(spec.fit, spec, FitDataError)
        source = str(spec.fit.path) if spec.fit.path else spec.fit.factory
        info.update(fitted_on="fit", source=source, samples=len(fit_raw))
        if learning:
            pipeline = pipeline.fit(_batch(fit_raw))
            if (spec.fit.path, spec.fit.factory) == (spec.evaluation.path, spec.evaluation.factory):
                info["warning"] = ("[fit] is the evaluation set: the preprocessing has seen the data it is scored "
                                   "on, so the measured metric is optimistic")
    report["preprocessing"] = info
    return pipeline


def _build_variant(spec: BuildSpec, vid: str, loaded: LoadedModel, base: bytes | None,
                   base_error: ConverterError | None, work: Path, cal: dict[str, np.ndarray],
                   cal_ref: list[np.ndarray], out_idx: int, options: dict[str, Any], out_names: list[str],
                   gate: tuple[float, metrics.CheckSpec]) -> tuple[bytes, dict[str, Any]]:
    from converter import onnx_variants as ov
    from converter.stage_spec import split_variant

    fmt, precision = split_variant(vid)[1].split("-", 1)
    if fmt == "onnx":
        if base is None:
            err = base_error or loaded.onnx_error or ConversionError("no ONNX model to start from")
            raise type(err)(err.message, step=err.step, variant=vid, fix=err.fix)
        if precision == "fp32":
            return base, {"method": "onnxruntime quant_pre_process (shape inference + graph optimization)"}
        if precision == "fp16":
            return ov.to_fp16(base, options)
        if precision == "int8":
            return ov.to_int8_static(base, work, cal, cal_ref[out_idx], options, out_idx)
        from converter.mixed_precision import gate_on

        return ov.to_int8_dynamic(base, work, options, cal=cal, output_index=out_idx,
                                  gate=gate_on(gate[1], spec.task, spec.metric, gate[0]))
    from converter import tflite_variants

    return tflite_variants.convert(loaded, precision, cal, options, (list(cal), out_names))


def _run_stage(spec: BuildSpec, stage: Any, prefix: str, loaded: LoadedModel, pipeline: Any,
               cal: dict[str, np.ndarray], work: Path
               ) -> tuple[LoadedModel, bytes | None, ConverterError | None, dict[str, Any]]:
    """Train one stage's model from the input model and load it like ``[model]`` (see converter.stages)."""
    from converter.errors import DataError
    from converter.sources import from_object, load_callable
    from converter.spec import DataSpec
    from converter.stages import StageError, run_stage

    model = loaded.keras_model if loaded.kind == "keras" else loaded.torch_module
    if model is None:
        raise StageError(f"[{stage.kind}] needs the Keras or PyTorch model object; the input is {loaded.kind}",
                         fix=f"give the original Keras/PyTorch model, or drop the {prefix}-* variants")
    d = stage.data
    raw, labels = load_raw(DataSpec(path=d.path, factory=d.factory, raw_key=d.raw_key, label_key=d.label_key,
                                    limit=d.limit), spec, DataError)

    def featurize(batch: np.ndarray) -> dict[str, np.ndarray]:
        return transform(pipeline, batch, DataError)

    student = load_callable(stage.student, spec.root)(model) if stage.kind == "distill" and stage.student else None
    try:
        obj, info = run_stage(stage, loaded.kind, model, student, raw, labels, featurize, list(cal), spec.task)
    except ConverterError:
        raise
    except Exception as exc:  # foreign training errors are translated once, here
        raise StageError(f"[{stage.kind}] training failed: {type(exc).__name__}: {str(exc)[:300]}",
                         fix=f"check [{stage.kind}] (data, student, learning_rate)") from exc
    derived = from_object(spec, obj, cal)
    base: bytes | None = None
    error: ConverterError | None = None
    if derived.onnx_bytes is not None and any(
            v.startswith(prefix + "-onnx") for v in spec.variants):
        from converter.onnx_variants import preprocess

        sub = work / f"stage-{prefix}"
        sub.mkdir(exist_ok=True)
        try:
            base = preprocess(derived.onnx_bytes, sub)
        except ConverterError as exc:
            error = exc
    return derived, base, error, info


def _run(spec: BuildSpec, report: dict[str, Any], work: Path, steps: _Steps, dry_run: bool,
         spec_sha: str, dump_dir: Path | None) -> None:
    from converter.runners import run_onnx, run_variant

    with steps.step("preprocessing + data"):
        pipeline = _fit(spec, make_pipeline(spec), report)
        cal_raw, _ = load_raw(spec.calibration, spec, CalibrationDataError)
        cal = transform(pipeline, cal_raw, CalibrationDataError)
        ev_raw, labels = load_raw(spec.evaluation, spec, EvaluationDataError)
        ev = transform(pipeline, ev_raw, EvaluationDataError)
    with steps.step("load model"):
        loaded = load_model(spec, cal)
    ref_model = loaded.onnx_bytes
    if ref_model is not None:
        ins = model_inputs(ref_model)
        check_features(cal, ins, CalibrationDataError, "calibration")
        check_features(ev, ins, EvaluationDataError, "evaluation")
    else:  # no ONNX translation: the TFLite fp32 conversion of the original is the reference
        ref_model = None
    out_idx = 0
    with steps.step("fp32 reference"):
        if ref_model is not None:
            import onnx

            out_names = [o.name for o in onnx.load_from_string(ref_model).graph.output]
            ref_outs = run_onnx(ref_model, ev)
            cal_ref = run_onnx(ref_model, cal)
        else:
            from converter import tflite_variants

            out_names = list(spec.model.output_names or ["output"])
            tfl, _ = tflite_variants.convert(loaded, "fp32", None, {}, (list(cal), out_names))
            ref_outs, cal_ref = run_variant("tflite", tfl, ev), run_variant("tflite", tfl, cal)
        out_idx, why = choose_output(spec, out_names, ref_outs)
        _check_labels(spec, out_names[out_idx], ref_outs[out_idx])
        ref_value = metrics.evaluate(spec.metric, ref_outs[out_idx], ref_outs[out_idx], labels,
                                     top_k=spec.top_k, names=spec.labels)
    report["metric"] = {"name": spec.metric, "reference": r6(ref_value), "budget": spec.budget,
                        "samples": len(ev_raw), "output": out_names[out_idx], "output_chosen_by": why,
                        "dataset": _dataset_name(spec), "checks": {
                            k: v for k, v in vars(spec.checks).items() if v is not None}}

    base: bytes | None = None
    base_error: ConverterError | None = None
    if any(split_variant(v)[1].startswith("onnx") for v in spec.variants) and loaded.onnx_bytes is not None:
        with steps.step("onnx pre-process"):
            try:
                from converter.onnx_variants import preprocess

                base = preprocess(loaded.onnx_bytes, work)
            except ConverterError as exc:
                base_error = exc

    models: dict[str, tuple[LoadedModel | None, bytes | None, ConverterError | None]] = {
        "": (loaded, base, base_error)}
    report["stages"] = {}
    for prefix in sorted({split_variant(v)[0] for v in spec.variants} - {""}):
        stage = spec.stages[PREFIXES[prefix]]
        with steps.step(f"{stage.kind}: train + export"):
            t = time.perf_counter()
            try:
                derived, d_base, d_error, info = _run_stage(spec, stage, prefix, loaded, pipeline, cal, work)
                models[prefix] = (derived, d_base, d_error)
                report["stages"][stage.kind] = {"status": "ok", **info}
            except ConverterError as exc:
                models[prefix] = (None, None, exc)
                report["stages"][stage.kind] = {"status": "failed", "error": exc.to_dict()}
            report["stages"][stage.kind]["seconds"] = round(time.perf_counter() - t, 2)

    results: list[VariantResult] = []
    with steps.step("variants: build + evaluate", total=len(spec.variants)) as advance:
        for vid in spec.variants:
            prefix, base_id = split_variant(vid)
            fmt, precision = base_id.split("-", 1)
            res = VariantResult(vid, fmt, "int8" if precision.startswith("int8") else precision, prefix=prefix)
            stage = spec.stages.get(PREFIXES[prefix]) if prefix else None
            budget = stage.budget if stage is not None and stage.budget is not None else spec.budget
            checkspec = stage.checks if stage is not None and stage.checks is not None else spec.checks
            t = time.perf_counter()
            try:
                m_loaded, m_base, m_error = models[prefix]
                if m_loaded is None:
                    assert m_error is not None
                    raise type(m_error)(m_error.message, step=m_error.step, variant=vid, fix=m_error.fix)
                options = spec.variant_options.get(vid, spec.variant_options.get(base_id, {}))
                res.data, res.quantization = _build_variant(spec, vid, m_loaded, m_base, m_error, work, cal,
                                                            cal_ref, out_idx, options, out_names, (budget, checkspec))
                res.outputs = run_variant(fmt, res.data, ev)
                value = metrics.evaluate(spec.metric, res.outputs[out_idx], ref_outs[out_idx], labels,
                                         top_k=spec.top_k, names=spec.labels)
                g = metrics.gate(spec.metric, value, ref_value, budget)
                found = metrics.checks(checkspec, spec.task, res.outputs[out_idx], ref_outs[out_idx], labels,
                                       spec.labels)
                res.checks = [c.to_dict() for c in found]
                failed = [c for c in found if not c.passed]
                res.value, res.delta, res.drop = g.value, g.delta, g.drop
                res.passed = g.passed and not failed
                main = metrics.gate(spec.metric, value, ref_value, spec.budget).passed and all(
                    c.passed for c in metrics.checks(spec.checks, spec.task, res.outputs[out_idx],
                                                     ref_outs[out_idx], labels, spec.labels))
                res.main_gate = res.passed and main
                where = f"[{stage.kind}] budget" if stage is not None and stage.budget is not None else "budget"
                if not g.passed:
                    raise AccuracyBudgetError(
                        f"{vid} loses {fmt_delta(spec.metric, g.drop).lstrip('+')} of {spec.metric} against the "
                        f"fp32 original; the {where} is {fmt_delta(spec.metric, g.budget).lstrip('+')}, so it "
                        f"is {fmt_delta(spec.metric, g.over_by).lstrip('+')} over", variant=vid,
                        fix="try other quantization settings (per_channel, calibration_method, more calibration "
                        "data, nodes_to_exclude), train the stage longer, or raise the budget if the loss is "
                        "acceptable")
                if failed:
                    raise AccuracyBudgetError(
                        f"{vid} passes the {spec.metric} budget but fails " + "; ".join(
                            f"{c.name} {c.value:.4g} (limit {c.limit:.4g}{', ' + c.detail if c.detail else ''})"
                            for c in failed), variant=vid,
                        fix="try other quantization settings (keep sensitive nodes in higher precision, "
                        "per_channel, more calibration data) or relax the check under [evaluation]")
            except ConverterError as exc:
                if exc.variant is None:
                    exc.variant = vid
                res.error = exc.to_dict()
            except Exception as exc:  # an unexpected failure in one variant must not stop the others
                res.error = ConversionError(f"{type(exc).__name__}: {exc}", variant=vid,
                                            fix="leave this variant out of [variants] build and report it"
                                            ).to_dict()
            res.build_seconds = round(time.perf_counter() - t, 3)
            results.append(res)
            advance()

    from converter.finish import finish

    finish(spec, report, results, pipeline, loaded, ev_raw, ev, ref_outs, out_names, work, steps, dry_run,
           spec_sha, dump_dir)
