"""Evaluation metrics with bootstrap 95% confidence intervals.

Every scalar is reported as ``{"value": v, "ci95": [lo, hi]}``: the percentile interval of the
metric over case-level bootstrap resamples (seeded, so the numbers are reproducible).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "binary_auc",
    "bootstrap",
    "classification_metrics",
    "expected_calibration_error",
    "segmentation_metrics",
]

BOOTSTRAP_ROUNDS = 1000


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties averaged); NaN with one class."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, seed: int = 0,
              rounds: int = BOOTSTRAP_ROUNDS) -> list[float]:
    """Percentile 95% interval of ``statistic(indices)`` over resamples of ``range(n)``."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        value = statistic(rng.integers(0, n, n))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _with_ci(statistic: Callable[[np.ndarray], float], n: int, seed: int) -> dict[str, Any]:
    return {"value": statistic(np.arange(n)), "ci95": bootstrap(statistic, n, seed=seed)}


def _binary_counts(pred: np.ndarray, truth: np.ndarray, positive: int) -> tuple[int, int, int, int]:
    p, t = pred == positive, truth == positive
    return int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int((~p & ~t).sum())


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                           threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity, F1, AUC, ECE, confusion matrix, per class.

    For two classes the last class is "positive" and is predicted when its probability is at
    least ``threshold``; precision/recall/specificity/F1 are for that class. For more classes
    they are macro averages and the prediction is the arg-max.

    Args:
        probs: ``(N, C)`` calibrated probabilities.
        labels: ``(N,)`` true class indices.
        classes: class names, in index order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    k = len(classes)
    if k == 2:
        pred = (probs[:, 1] >= threshold).astype(int)
    else:
        pred = probs.argmax(axis=1)

    def per_class(idx: np.ndarray, c: int) -> tuple[float, float, float, float]:
        tp, fp, fn, tn = _binary_counts(pred[idx], labels[idx], c)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * precision * recall, precision + recall)
        return precision, recall, _ratio(tn, tn + fp), f1

    def summary(idx: np.ndarray, which: int) -> float:
        if k == 2:
            return per_class(idx, 1)[which]
        return float(np.nanmean([per_class(idx, c)[which] for c in range(k)]))

    def auc(idx: np.ndarray) -> float:
        if k == 2:
            return binary_auc(probs[idx, 1], labels[idx] == 1)
        return float(np.nanmean([binary_auc(probs[idx, c], labels[idx] == c) for c in range(k)]))

    n = len(labels)
    out: dict[str, Any] = {
        "n": n,
        "threshold": threshold if k == 2 else None,
        "accuracy": _with_ci(lambda i: float((pred[i] == labels[i]).mean()), n, seed),
        "precision": _with_ci(lambda i: summary(i, 0), n, seed),
        "recall": _with_ci(lambda i: summary(i, 1), n, seed),
        "specificity": _with_ci(lambda i: summary(i, 2), n, seed),
        "f1": _with_ci(lambda i: summary(i, 3), n, seed),
        "auc": _with_ci(auc, n, seed),
        "ece": _with_ci(lambda i: expected_calibration_error(probs[i], labels[i]), n, seed),
        "confusion_matrix": {
            "labels": list(classes),
            "rows_true_columns_predicted": [[int(((labels == t) & (pred == p)).sum())
                                             for p in range(k)] for t in range(k)],
        },
        "per_class": {},
    }
    all_idx = np.arange(n)
    for c, name in enumerate(classes):
        precision, recall, specificity, f1 = per_class(all_idx, c)
        out["per_class"][name] = {
            "precision": precision, "recall": recall, "specificity": specificity, "f1": f1,
            "auc": binary_auc(probs[:, c], labels == c), "support": int((labels == c).sum()),
        }
    return out


def _column_mean(values: np.ndarray, column: int) -> Callable[[np.ndarray], float]:
    def mean(index: np.ndarray) -> float:
        return float(np.nanmean(values[index, column]))

    return mean


def segmentation_metrics(dice: np.ndarray, hd95: np.ndarray, classes: Sequence[str], *,
                         seed: int = 0) -> dict[str, Any]:
    """Mean Dice over foreground classes and per-class Dice / HD95, with CIs over cases.

    Args:
        dice: ``(cases, foreground classes)`` Dice per case.
        hd95: ``(cases, foreground classes)`` 95th-percentile Hausdorff distance in mm.
        classes: foreground class names.
    """
    n = dice.shape[0]
    out: dict[str, Any] = {
        "n": n,
        "dice": _with_ci(lambda i: float(np.nanmean(dice[i])), n, seed),
        "dice_per_class": {},
        "hd95_per_class": {},
    }
    for c, name in enumerate(classes):
        out["dice_per_class"][name] = _with_ci(_column_mean(dice, c), n, seed)
        out["hd95_per_class"][name] = _with_ci(_column_mean(hd95, c), n, seed)
    return out
