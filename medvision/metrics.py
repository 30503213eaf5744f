"""Evaluation metrics with 95% confidence intervals that mean something.

* Proportions (accuracy, sensitivity/recall, specificity, precision) get **Wilson score**
  intervals (``scipy.stats.binomtest(...).proportion_ci``): correct at the edges, where a
  bootstrap collapses (11/11 correct is 1.000, 95% CI 0.741-1.000, not 1.000-1.000).
* Everything else (AUC, F1, ECE, macro averages, Dice, HD95) gets a **bias-corrected and
  accelerated (BCa) bootstrap** through ``scipy.stats.bootstrap`` over cases, resampled
  within each class for classification (stratified: every resample keeps the class sizes).
  Where BCa is undefined (a statistic constant over resamples) the percentile interval is
  reported, and the method says so.

Every scalar is ``{"value": v, "ci95": [lo, hi], "ci_method": "wilson" | "bca" |
"percentile"}``; resampling is seeded, so the numbers are reproducible. AUC is MONAI's
``compute_roc_auc``, the same function training uses to pick the best epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Statistic",
    "auc_statistic",
    "balanced_accuracy_statistic",
    "binary_auc",
    "bootstrap_interval",
    "classification_metrics",
    "detection_metrics",
    "match_detections",
    "expected_calibration_error",
    "paired_difference",
    "predicted_classes",
    "recall_statistic",
    "segmentation_metrics",
    "wilson",
]

BOOTSTRAP_ROUNDS = 2000

#: A metric of a resample: case indices in, one value out (what the bootstrap resamples).
Statistic = Callable[[np.ndarray], float]


def wilson(successes: int, total: int) -> dict[str, Any]:
    """A proportion with its Wilson score 95% interval (NaN without cases)."""
    if total <= 0:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")],
                "ci_method": "wilson", "n": 0}
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(total)).proportion_ci(confidence_level=0.95,
                                                                  method="wilson")
    return {"value": successes / total, "ci95": [float(interval.low), float(interval.high)],
            "ci_method": "wilson", "n": int(total)}


def bootstrap_interval(statistic: Callable[[np.ndarray], float],
                       strata: Sequence[np.ndarray], *, seed: int = 0,
                       rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, Any]:
    """``statistic`` over all cases, with a BCa bootstrap 95% interval.

    Args:
        statistic: maps an array of case indices to a number.
        strata: the case indices of each stratum (each class); resamples are drawn within
            each, so they keep its size. One stratum: plain case resampling.
    """
    from scipy.stats import bootstrap

    strata = [np.asarray(s, dtype=int) for s in strata if len(s)]
    everything = np.concatenate(strata) if strata else np.array([], dtype=int)
    value = statistic(everything) if len(everything) else float("nan")
    out: dict[str, Any] = {"value": value, "ci95": [float("nan"), float("nan")],
                           "ci_method": "bca"}
    if not math.isfinite(value) or len(everything) < 3:
        return out

    def joined(*parts: np.ndarray) -> float:
        return statistic(np.concatenate([np.asarray(p, dtype=int) for p in parts]))

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = bootstrap(tuple(strata), joined, n_resamples=rounds, method=method,
                                   vectorized=False, paired=False, confidence_level=0.95,
                                   rng=np.random.default_rng(seed))
            except (ValueError, ZeroDivisionError, FloatingPointError):
                continue
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            out.update(ci95=[low, high], ci_method=method.lower())
            return out
    return out


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (MONAI's ``compute_roc_auc``; ties averaged); NaN with one
    class."""
    import torch
    from monai.metrics import compute_roc_auc

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    value: Any = compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                                 torch.as_tensor(positive.astype(np.float64)))
    return float(value)


def predicted_classes(probs: np.ndarray, threshold: float | None = 0.5) -> np.ndarray:
    """The decision: for two classes the last one where its probability is at least
    ``threshold``; for more (or no threshold) the arg-max."""
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def auc_statistic(probs: np.ndarray, truth: np.ndarray) -> Statistic:
    """AUC of the chosen cases: the last class's for two classes, else the mean of each
    class's one-vs-rest AUC."""
    k = probs.shape[1]

    def auc(index: np.ndarray) -> float:
        if k == 2:
            return binary_auc(probs[index, 1], truth[index] == 1)
        return float(np.nanmean([binary_auc(probs[index, c], truth[index] == c)
                                 for c in range(k)]))

    return auc


def recall_statistic(pred: np.ndarray, truth: np.ndarray, c: int) -> Statistic:
    """Share of the chosen class-``c`` cases predicted as ``c`` (NaN when there is none)."""
    def recall(index: np.ndarray) -> float:
        mask = truth[index] == c
        return float(np.mean(pred[index][mask] == c)) if mask.any() else float("nan")

    return recall


def balanced_accuracy_statistic(pred: np.ndarray, truth: np.ndarray, k: int) -> Statistic:
    """Mean of the ``k`` classes' recalls over the chosen cases."""
    recalls = [recall_statistic(pred, truth, c) for c in range(k)]
    return lambda index: float(np.nanmean([recall(index) for recall in recalls]))


def paired_difference(first: Statistic, second: Statistic) -> Statistic:
    """``second - first`` on the same chosen cases (the paired difference to bootstrap)."""
    def difference(index: np.ndarray) -> float:
        return second(index) - first(index)

    return difference


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


def _bind(function: Callable[[np.ndarray, int], float],
          value: int) -> Callable[[np.ndarray], float]:
    """``function`` with its second argument fixed."""
    def bound(index: np.ndarray) -> float:
        return function(index, value)

    return bound


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
    pred = predicted_classes(probs, threshold)

    def per_class(idx: np.ndarray, c: int) -> tuple[float, float, float, float]:
        tp, fp, fn, tn = _binary_counts(pred[idx], labels[idx], c)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * precision * recall, precision + recall)
        return precision, recall, _ratio(tn, tn + fp), f1

    def summary(idx: np.ndarray, which: int) -> float:
        if k == 2:
            return per_class(idx, 1)[which]
        return float(np.nanmean([per_class(idx, c)[which] for c in range(k)]))

    auc = auc_statistic(probs, labels)

    n = len(labels)
    strata = [np.flatnonzero(labels == c) for c in range(k)]

    def interval(statistic: Callable[[np.ndarray], float]) -> dict[str, Any]:
        return bootstrap_interval(statistic, strata, seed=seed)

    def proportion(c: int, which: str) -> dict[str, Any]:
        tp, fp, fn, tn = _binary_counts(pred, labels, c)
        hits, total = {"precision": (tp, tp + fp), "recall": (tp, tp + fn),
                       "specificity": (tn, tn + fp)}[which]
        return wilson(hits, total)

    if k == 2:
        proportions = {w: proportion(1, w) for w in ("precision", "recall", "specificity")}
    else:  # macro averages are not proportions
        proportions = {w: interval(_bind(summary, j))
                       for j, w in enumerate(("precision", "recall", "specificity"))}
    out: dict[str, Any] = {
        "n": n,
        "threshold": threshold if k == 2 else None,
        "accuracy": wilson(int((pred == labels).sum()), n),
        **proportions,
        "f1": interval(lambda i: summary(i, 3)),
        "auc": interval(auc),
        "ece": interval(lambda i: expected_calibration_error(probs[i], labels[i])),
        "confusion_matrix": {
            "labels": list(classes),
            "rows_true_columns_predicted": [[int(((labels == t) & (pred == p)).sum())
                                             for p in range(k)] for t in range(k)],
        },
        "per_class": {},
    }
    for c, name in enumerate(classes):
        tp, fp, fn, tn = _binary_counts(pred, labels, c)
        out["per_class"][name] = {
            "precision": wilson(tp, tp + fp), "recall": wilson(tp, tp + fn),
            "specificity": wilson(tn, tn + fp),
            "f1": interval(_bind(lambda i, cls: per_class(i, cls)[3], c)),
            "auc": interval(_bind(lambda i, cls: binary_auc(probs[i, cls], labels[i] == cls),
                                  c)),
            "support": int((labels == c).sum()),
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
    cases = [np.arange(n)]
    out: dict[str, Any] = {
        "n": n,
        "dice": bootstrap_interval(lambda i: float(np.nanmean(dice[i])), cases, seed=seed),
        "dice_per_class": {},
        "hd95_per_class": {},
    }
    for c, name in enumerate(classes):
        out["dice_per_class"][name] = bootstrap_interval(_column_mean(dice, c), cases, seed=seed)
        out["hd95_per_class"][name] = {
            **bootstrap_interval(_column_mean(hd95, c), cases, seed=seed), "unit": "mm"}
    return out


# --- detection ----------------------------------------------------------------------------


def match_detections(found: Mapping[str, Any], truth: Mapping[str, Any], *,
                     iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching of one image's detections, highest score first: a detection is a hit
    when an unmatched true box of its class overlaps it by at least ``iou``.

    Returns ``(scores, labels, hits)`` of the detections, in descending score order.
    """
    from monai.data.box_utils import box_iou

    boxes = np.asarray(found.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(found.get("labels", np.zeros(0)), dtype=np.int64).reshape(-1)
    scores = np.asarray(found.get("scores", np.zeros(0)), dtype=np.float32).reshape(-1)
    true_boxes = np.asarray(truth["boxes"], dtype=np.float32).reshape(-1, 4)
    true_labels = np.asarray(truth["labels"], dtype=np.int64).reshape(-1)
    overlap = (np.asarray(box_iou(boxes, true_boxes)) if len(boxes) and len(true_boxes)
               else np.zeros((len(boxes), len(true_boxes))))
    order = np.argsort(-scores, kind="stable")
    taken: set[int] = set()
    hits = np.zeros(len(order), dtype=float)
    for rank, k in enumerate(order):
        free = [int(j) for j in np.flatnonzero((true_labels == labels[k]) & (overlap[k] >= iou))
                if int(j) not in taken]
        if free:
            taken.add(max(free, key=lambda j: overlap[k, j]))
            hits[rank] = 1.0
    return scores[order], labels[order], hits


def detection_metrics(predictions: Sequence[Mapping[str, Any]],
                      truths: Sequence[Mapping[str, Any]], classes: Sequence[str], *,
                      seed: int = 0, intervals: bool = True,
                      rounds: int = 500) -> dict[str, Any]:
    """COCO-style detection metrics (MONAI's ``COCOMetric`` and ``matching_batch``).

    ``map_50`` and ``map_50_95`` (mean over classes of AP at IoU 0.5, and averaged over IoU
    0.5:0.95), per class ``ap_50``, the mean absolute error of the count per image and class,
    and the recall at IoU 0.5 at 1, 2, 4 and 8 false positives per image; with ``intervals``
    each gets a 95% percentile bootstrap interval over images (``rounds`` resamples; the
    COCO computation is too slow for BCa's jackknife here).

    Args:
        predictions: per image ``boxes`` (N, 4), ``labels`` (N,), ``scores`` (N,).
        truths: per image ``boxes`` and ``labels``.
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    metric = COCOMetric(classes=list(classes), iou_list=[0.5], iou_range=[0.5, 0.95, 0.05],
                        max_detection=[100], verbose=False)

    def arrays(item: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: Any) -> Any:
        value = np.asarray(item.get(key, np.zeros(shape)), dtype=dtype)
        return value.reshape(shape) if value.size == 0 else value

    pb = [arrays(p, "boxes", (0, 4), np.float32) for p in predictions]
    pc = [arrays(p, "labels", (0,), np.int64) for p in predictions]
    ps = [arrays(p, "scores", (0,), np.float32) for p in predictions]
    gb = [arrays(t, "boxes", (0, 4), np.float32) for t in truths]
    gc = [arrays(t, "labels", (0,), np.int64) for t in truths]
    matched = matching_batch(iou_fn=box_iou,  # type: ignore[arg-type]
                             iou_thresholds=list(metric.iou_thresholds),
                             pred_boxes=pb, pred_classes=pc, pred_scores=ps, gt_boxes=gb,
                             gt_classes=gc, max_detections=100)
    n = len(truths)
    counts_pred = np.array([[int(((pc[i] == c) & (ps[i] >= 0.5)).sum()) for c in
                             range(len(classes))] for i in range(n)], dtype=float)
    counts_true = np.array([[int((gc[i] == c).sum()) for c in range(len(classes))]
                            for i in range(n)], dtype=float)

    def coco(index: np.ndarray) -> dict[str, float]:
        return dict(metric([matched[i] for i in index])[0])

    # greedy matching does not depend on which images a resample draws: done once
    matches = [match_detections(predictions[i], truths[i]) for i in range(n)]

    def recall_at(index: np.ndarray, fp_per_image: float) -> float:
        positives = int(sum(len(gb[i]) for i in index))
        if positives == 0:
            return float("nan")
        scores = np.concatenate([matches[i][0] for i in index])
        hits = np.concatenate([matches[i][2] for i in index])
        hit = hits[np.argsort(-scores, kind="stable")]
        false = np.cumsum(1 - hit)
        within = false <= fp_per_image * len(index)
        return float(np.cumsum(hit)[within][-1] / positives) if within.any() else 0.0

    def stats(index: np.ndarray) -> dict[str, float]:
        found = coco(index)
        values = {"map_50": found["AP_IoU_0.50_MaxDet_100"],
                  "map_50_95": found["mAP_IoU_0.50_0.95_0.05_MaxDet_100"],
                  "count_mae": float(np.abs(counts_pred[index] - counts_true[index]).mean())}
        for name in classes:
            values[f"ap_50:{name}"] = found.get(f"{name}_AP_IoU_0.50_MaxDet_100", float("nan"))
        for c, name in enumerate(classes):
            values[f"count_mae:{name}"] = float(
                np.abs(counts_pred[index, c] - counts_true[index, c]).mean())
        for fp in (1, 2, 4, 8):
            values[f"recall_at_{fp}_fp"] = recall_at(index, fp)
        return values

    point = stats(np.arange(n))
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    if intervals and n >= 3:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {k: [] for k in point}
        for _ in range(rounds):
            for key, value in stats(rng.integers(0, n, n)).items():
                if math.isfinite(value):
                    samples[key].append(value)
        for key, values in samples.items():
            if values:
                lows[key], highs[key] = (float(v) for v in np.percentile(values, [2.5, 97.5]))

    def entry(key: str, unit: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"value": float(point[key]),
                               "ci95": [lows.get(key, float("nan")), highs.get(key, float("nan"))],
                               "ci_method": "percentile"}
        if unit:
            out["unit"] = unit
        return out

    return {
        "n": n,
        "map_50": entry("map_50"), "map_50_95": entry("map_50_95"),
        "count_mae": entry("count_mae", "objects per image"),
        **{f"recall_at_{fp}_fp_per_image": entry(f"recall_at_{fp}_fp") for fp in (1, 2, 4, 8)},
        "per_class": {name: {"ap_50": entry(f"ap_50:{name}"),
                             "count_mae": entry(f"count_mae:{name}", "objects per image"),
                             "support": int(counts_true[:, c].sum())}
                      for c, name in enumerate(classes)},
    }
