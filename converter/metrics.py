"""Metrics and the accuracy gate. Pure functions on arrays: no runtime, no I/O.

Every metric is "higher is better" except MAE. The gate compares each variant with the fp32
original on the same evaluation data: ``drop`` is how much worse the variant is, in the
metric's own units (accuracy 0.005 = half a percentage point), and a variant whose drop
exceeds the budget is refused.
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
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = np.sum(a2 * b2, axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


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
