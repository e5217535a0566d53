"""Metrics and the accuracy gate. Pure functions on arrays: no runtime, no I/O.

Every metric is "higher is better" except MAE. The gate compares each variant with the fp32
original on the same evaluation data: ``drop`` is how much worse the variant is, in the
metric's own units (accuracy 0.005 = half a percentage point), and a variant whose drop
exceeds the budget is refused.

A mean hides what users of a task feel, so task-matched :func:`checks` come on top: for
embeddings the worst-case (and optionally 5th-percentile) cosine and nearest-neighbour agreement
(rankings are what retrieval users rely on); for classifiers the largest accuracy loss of any single
class. A variant ships only if the metric and every check pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from converter.errors import EvaluationDataError

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "cosine": True, "agreement": True, "mae": False}


@dataclass(frozen=True)
class GateResult:
    """The outcome of the accuracy gate for one variant."""

    metric: str
    value: float
    reference: float
    delta: float
    drop: float
    budget: float

    @property
    def passed(self) -> bool:
        return self.drop <= self.budget + 1e-12

    @property
    def over_by(self) -> float:
        return max(0.0, self.drop - self.budget)


def _class_index(labels: np.ndarray, names: tuple[str, ...] | None) -> np.ndarray:
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if names is None:
        raise EvaluationDataError("labels are strings but [task] labels is not set",
                                  fix="list the class names in [task] labels, in output order")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(x) for x in labels} - set(index))
    if unknown:
        raise EvaluationDataError(f"labels {unknown[:5]} are not in [task] labels",
                                  fix="make the evaluation labels match [task] labels")
    return np.array([index[str(x)] for x in labels], dtype=np.int64)


def accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1, names: tuple[str, ...] | None = None) -> float:
    """Top-k accuracy (fraction) of class scores against integer or named labels."""
    y = _class_index(labels, names)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def f1_macro(scores: np.ndarray, labels: np.ndarray, names: tuple[str, ...] | None = None) -> float:
    """Macro-averaged F1 over the classes present in labels or predictions."""
    y = _class_index(labels, names)
    pred = np.argmax(scores, axis=1)
    f1s = []
    for c in np.union1d(y, pred):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(pred.astype(np.float64).reshape(target.shape) - target.astype(np.float64))))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity (embeddings of the variant vs the fp32 embeddings)."""
    return float(np.mean(cosines(a, b)))


def agreement(scores: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose top class equals the fp32 model's top class (no labels needed)."""
    return float(np.mean(np.argmax(scores, axis=1) == np.argmax(reference, axis=1)))


def evaluate(metric: str, out: np.ndarray, reference_out: np.ndarray, labels: np.ndarray | None, *,
             top_k: int = 1, names: tuple[str, ...] | None = None) -> float:
    """The declared metric of one model's outputs. Label-free metrics compare with fp32 outputs."""
    if metric in ("accuracy", "f1", "mae") and labels is None:
        raise EvaluationDataError(f"metric {metric!r} needs labels but the evaluation set has none",
                                  fix="add labels (label_key) or use metric = \"agreement\" / \"cosine\"")
    if metric == "accuracy":
        assert labels is not None
        return accuracy(out, labels, top_k, names)
    if metric == "f1":
        assert labels is not None
        return f1_macro(out, labels, names)
    if metric == "mae":
        assert labels is not None
        return mae(out, labels)
    if metric == "cosine":
        return mean_cosine(out, reference_out)
    if metric == "agreement":
        return agreement(out, reference_out)
    raise EvaluationDataError(f"unknown metric {metric!r}")


def gate(metric: str, value: float, reference: float, budget: float) -> GateResult:
    """Compare a variant with the fp32 original; ``drop`` > ``budget`` means refuse."""
    delta = value - reference
    drop = -delta if HIGHER_IS_BETTER[metric] else delta
    return GateResult(metric=metric, value=value, reference=reference, delta=delta, drop=drop, budget=budget)


# ---- task-matched checks: what a user of the task relies on, beyond the mean ----------------------------

@dataclass(frozen=True)
class Check:
    """One task-matched check of a variant against the fp32 original (e.g. worst-case cosine >= 0.98)."""

    name: str
    value: float
    limit: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "value": float(f"{self.value:.6g}"), "limit": float(f"{self.limit:.6g}"),
                "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class CheckSpec:
    """Limits of the task-matched checks (``[evaluation]`` keys); None switches a check off."""

    min_cosine: float | None = None
    """Embeddings: the worst sample's cosine to its fp32 embedding must be at least this."""
    p5_cosine: float | None = None
    """Embeddings: the 5th-percentile cosine must be at least this."""
    nn_agreement: float | None = None
    """Embeddings: share of samples whose nearest neighbour in the evaluation set stays the same."""
    class_budget: float | None = None
    """Classifiers: how much accuracy any single class may lose against fp32."""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return np.asarray(np.sum(a2 * b2, axis=1) / np.maximum(den, 1e-12))


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine), ties to the lower index."""
    e = emb.reshape(len(emb), -1).astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(np.argmax(sim, axis=1))


def nn_agreement(out: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose nearest neighbour (among the other samples) is the same as with fp32.

    Both sides are embedded by the same model, as on a device that indexes and queries with one model.
    """
    if len(out) < 3:
        return 1.0
    return float(np.mean(nearest_neighbours(out) == nearest_neighbours(reference)))


def class_accuracies(scores: np.ndarray, labels: np.ndarray, names: tuple[str, ...] | None = None
                     ) -> dict[int, float]:
    """Accuracy (recall) of each class present in the labels."""
    y = _class_index(labels, names)
    pred = np.argmax(scores.reshape(len(scores), -1), axis=1)
    return {int(c): float(np.mean(pred[y == c] == c)) for c in np.unique(y)}


def checks(spec: CheckSpec, task: str, out: np.ndarray, reference_out: np.ndarray, labels: np.ndarray | None,
           names: tuple[str, ...] | None = None) -> list[Check]:
    """The task-matched checks of one variant's outputs against the fp32 outputs on the evaluation set."""
    found: list[Check] = []
    if task == "embedding":
        cos = cosines(out, reference_out)
        worst = int(np.argmin(cos))
        if spec.min_cosine is not None:
            found.append(Check("worst_cosine", float(cos[worst]), spec.min_cosine,
                               bool(cos[worst] >= spec.min_cosine - 1e-12), f"sample {worst}"))
        if spec.p5_cosine is not None:
            p5 = float(np.percentile(cos, 5))
            found.append(Check("p5_cosine", p5, spec.p5_cosine, p5 >= spec.p5_cosine - 1e-12))
        if spec.nn_agreement is not None:
            agree = nn_agreement(out, reference_out)
            changed = round((1 - agree) * len(out))
            found.append(Check("nn_agreement", agree, spec.nn_agreement, agree >= spec.nn_agreement - 1e-12,
                               f"{changed} of {len(out)} samples changed their nearest neighbour"))
    elif task == "classification" and labels is not None and spec.class_budget is not None \
            and out.ndim == 2 and out.shape[1] > 1:
        ref_acc = class_accuracies(reference_out, labels, names)
        acc = class_accuracies(out, labels, names)
        drops = {c: ref_acc[c] - acc[c] for c in ref_acc}
        worst_c = max(drops, key=lambda c: (drops[c], -c))
        label = names[worst_c] if names and worst_c < len(names) else str(worst_c)
        found.append(Check("class_accuracy_drop", drops[worst_c], spec.class_budget,
                           bool(drops[worst_c] <= spec.class_budget + 1e-12),
                           f"class {label}: {acc[worst_c] * 100:.1f}% vs fp32 {ref_acc[worst_c] * 100:.1f}% "
                           f"({int(np.sum(_class_index(labels, names) == worst_c))} samples)"))
    return found
