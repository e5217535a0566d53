"""``[prune]`` and ``[distill]``: the optional training stages of a build, parsed into frozen specs.

A stage makes a *derived model* from the input model; its variants are listed in ``[variants] build``
with the stage's prefix (``pruned-onnx-int8``, ``student-tflite-int8``) and are converted, quantized,
gated and measured exactly like the original's, against the same fp32 original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import SpecError
from converter.metrics import CheckSpec

PREFIXES = {"pruned": "prune", "student": "distill"}
"""Variant-id prefix -> the section that makes its model."""


@dataclass(frozen=True)
class StageData:
    """Where a stage's training data comes from (raw samples; labels are used when present)."""

    path: Path | None = None
    factory: str | None = None
    raw_key: str = "x"
    label_key: str | None = "y"
    limit: int | None = None


@dataclass(frozen=True)
class StageSpec:
    """One training stage. ``kind`` is ``prune`` or ``distill``."""

    kind: str
    data: StageData
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    sparsity: float = 0.5
    """prune: share of the weights of each Dense/Conv/Linear layer set to zero (magnitude, unstructured)."""
    student: str | None = None
    """distill: ``"file.py:function"`` taking the teacher and returning the student, else derived."""
    width: float = 0.5
    """distill, derived Keras student: channels and units of every layer but the output, times this."""
    keep_layers: tuple[int, ...] | None = None
    """distill, derived torch student: the entries of the model's largest layer list to keep."""
    temperature: float = 1.0
    budget: float | None = None
    """This stage's own metric budget against fp32 (default: [evaluation] budget)."""
    checks: CheckSpec | None = None
    """This stage's own task-matched limits (default: [evaluation]'s)."""
    extra: dict[str, Any] = field(default_factory=dict)


_KEYS = {"prune": {"data", "epochs", "batch_size", "learning_rate", "seed", "sparsity", "budget", "min_cosine",
                   "p5_cosine", "nn_agreement", "class_budget"},
         "distill": {"data", "epochs", "batch_size", "learning_rate", "seed", "student", "width", "keep_layers",
                     "temperature", "budget", "min_cosine", "p5_cosine", "nn_agreement", "class_budget"}}


def _num(table: dict[str, Any], section: str, key: str, default: float, lo: float, hi: float,
         integer: bool = False) -> Any:
    value = table.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise SpecError(f"[{section}] {key} must be {kind} in [{lo}, {hi}], found {value!r}")
    return value


def parse_stage(section: str, table: Any, root: Path, task: str, metric: str, budget: float) -> StageSpec:
    """Validate ``[prune]`` or ``[distill]``; every message names the section and key."""
    from converter.spec import _limit, parse_checks, resolve_path

    if not isinstance(table, dict):
        raise SpecError(f"[{section}] must be a table, found {type(table).__name__}")
    unknown = sorted(set(table) - _KEYS[section])
    if unknown:
        raise SpecError(f"[{section}] has unknown keys {unknown}; known: {sorted(_KEYS[section])}")
    data_t = table.get("data")
    if not isinstance(data_t, dict) or not (data_t.get("path") or data_t.get("factory")):
        raise SpecError(f"[{section}] data must name the training samples: a table with `path` or `factory`",
                        fix=f'add data = {{ factory = "recipe.py:training" }} under [{section}]')
    data = StageData(path=resolve_path(str(data_t["path"]), root) if data_t.get("path") else None,
                     factory=data_t.get("factory"), raw_key=str(data_t.get("raw_key", "x")),
                     label_key=None if data_t.get("label_key", "y") in (None, "", False) else str(
                         data_t.get("label_key", "y")),
                     limit=data_t.get("limit"))
    own_budget = table.get("budget")
    if own_budget is not None:
        own_budget = float(_num(table, section, "budget", 0.0, 0.0, 1e9))
    check_keys = {"min_cosine", "p5_cosine", "nn_agreement", "class_budget"} & set(table)
    checks = None
    if check_keys or own_budget is not None:
        derived = parse_checks({k: table[k] for k in check_keys}, task, metric, own_budget or budget)
        checks = CheckSpec(**{k: (_limit(table, k, None, -1.0, 1.0) if k in check_keys else getattr(derived, k))
                              for k in ("min_cosine", "p5_cosine", "nn_agreement", "class_budget")})
    keep = table.get("keep_layers")
    if keep is not None and (not isinstance(keep, list) or not keep
                             or not all(isinstance(i, int) and i >= 0 for i in keep)):
        raise SpecError(f"[{section}] keep_layers must be a non-empty list of layer indices, found {keep!r}")
    student = table.get("student")
    if student is not None and (not isinstance(student, str) or ":" not in student):
        raise SpecError(f"[{section}] student must look like \"file.py:function\", found {student!r}")
    return StageSpec(
        kind=section, data=data,
        epochs=int(_num(table, section, "epochs", 5, 1, 10_000, integer=True)),
        batch_size=int(_num(table, section, "batch_size", 32, 1, 65_536, integer=True)),
        learning_rate=float(_num(table, section, "learning_rate", 1e-3, 0.0, 10.0)),
        seed=int(_num(table, section, "seed", 0, 0, 2**31 - 1, integer=True)),
        sparsity=float(_num(table, section, "sparsity", 0.5, 0.0, 0.99)),
        student=student, width=float(_num(table, section, "width", 0.5, 0.01, 1.0)),
        keep_layers=tuple(keep) if keep else None,
        temperature=float(_num(table, section, "temperature", 1.0, 0.01, 100.0)),
        budget=own_budget, checks=checks,
    )


def split_variant(vid: str) -> tuple[str, str]:
    """``student-onnx-int8`` -> (``student``, ``onnx-int8``); an original variant has prefix ``""``."""
    head, _, rest = vid.partition("-")
    if head in PREFIXES:
        return head, rest
    return "", vid
