"""Is one model better than another on the same cases? (``medvision compare A B``)

Two evaluation folders written by ``medvision evaluate`` (``cases.csv`` for segmentation,
``predictions.csv`` for classification) are matched case by case, and every metric is given
for both and as the paired difference B minus A, each with a BCa bootstrap 95% interval over
the same resampled cases (resampled within each class for classification), together with how
many cases each one is better on. Two separate confidence intervals that overlap say little
about which model is better; the paired interval does. Detection evaluations have no per-case
file and are refused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import ConfigError, DataError
from medvision.metrics import (
    Statistic,
    auc_statistic,
    balanced_accuracy_statistic,
    bootstrap_interval,
    paired_difference,
    predicted_classes,
    recall_statistic,
)

__all__ = ["Comparison", "MetricComparison", "compare_evaluations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricComparison:
    """One metric of both evaluations and their paired difference (B minus A)."""

    name: str
    first: dict[str, Any]
    second: dict[str, Any]
    difference: dict[str, Any]
    higher_is_better: bool
    first_better: int | None
    """Cases where A is better (classification: A right and B wrong, among the cases the
    metric counts); None where a metric has no per-case value (AUC, balanced accuracy)."""
    second_better: int | None
    """Cases where B is better, likewise."""


@dataclass(frozen=True)
class Comparison:
    """``comparison.json``: which cases were compared and every metric's paired difference."""

    task: str
    first: dict[str, Any]
    second: dict[str, Any]
    n: int
    matched_by: str
    """How cases were paired: "path", "file name" or "order"."""
    only_first: int
    only_second: int
    metrics: tuple[MetricComparison, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        """The comparison as a Markdown table."""
        def name(side: dict[str, Any]) -> str:
            return f"{side['pipeline']} {side['version']} ({side['folder']})"

        lines = [f"A: {name(self.first)}", f"B: {name(self.second)}",
                 f"{self.n} cases paired by {self.matched_by}"
                 + (f"; {self.only_first} only in A, {self.only_second} only in B"
                    if self.only_first or self.only_second else ""),
                 "", "| metric | A | B | B - A (paired 95% CI) | A better | B better |",
                 "|---|---|---|---|---|---|"]
        for m in self.metrics:
            low, high = m.difference["ci95"]
            lines.append(f"| {m.name}{'' if m.higher_is_better else ' (lower is better)'} | "
                         f"{_number(m.first['value'])} | {_number(m.second['value'])} | "
                         f"{_number(m.difference['value'], sign=True)} "
                         f"({_number(low, sign=True)} to {_number(high, sign=True)}) | "
                         f"{_count(m.first_better)} | {_count(m.second_better)} |")
        return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _number(value: float, *, sign: bool = False) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.4f}" if sign else f"{value:.4f}"


@dataclass(frozen=True)
class _Evaluation:
    folder: Path
    task: str
    names: list[str]
    labels: list[str]
    """Classification: the true class of each case (empty for segmentation)."""
    columns: dict[str, np.ndarray]
    meta: dict[str, Any]


def _read(folder: Path) -> _Evaluation:
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        raise DataError(f"{folder}: not an evaluation folder (no metrics.json); write one "
                        "with 'medvision evaluate'")
    try:
        meta = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{metrics_file}: unreadable ({e})") from e
    if (folder / "cases.csv").is_file():
        task, table = "segmentation", folder / "cases.csv"
    elif (folder / "predictions.csv").is_file():
        task, table = "classification", folder / "predictions.csv"
    else:
        raise DataError(f"{folder}: no cases.csv or predictions.csv (detection evaluations "
                        "have no per-case results to pair)")
    try:
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = {key: np.array([float(r[key]) for r in rows]) for key in rows[0]
                   if key not in ("item", "label")} if rows else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{table}: unreadable ({e})") from e
    if not rows:
        raise DataError(f"{table}: no cases")
    return _Evaluation(folder, task, [r["item"] for r in rows],
                       [r["label"] for r in rows] if task == "classification" else [],
                       columns, meta)


def _pairs(a: _Evaluation, b: _Evaluation) -> tuple[np.ndarray, np.ndarray, str]:
    """Row indices of the same cases in ``a`` and ``b``, and how they were matched."""
    def unique(names: list[str]) -> bool:
        return all(names) and len(set(names)) == len(names)

    named = unique(a.names) and unique(b.names)
    for how, key in (("path", str), ("file name", lambda n: n.replace("\\", "/")
                                                          .rsplit("/", 1)[-1])):
        first, second = [key(n) for n in a.names], [key(n) for n in b.names]
        if unique(first) and unique(second):
            where = {n: i for i, n in enumerate(second)}
            both = [(i, where[n]) for i, n in enumerate(first) if n in where]
            if both:
                rows = np.array(both, dtype=int)
                return rows[:, 0], rows[:, 1], how
    # cases without unique names (arrays of an .npz file): only the same list, in order
    if not named and len(a.names) == len(b.names) and a.labels == b.labels:
        order = np.arange(len(a.names))
        return order, order, "order"
    raise DataError(f"{a.folder} and {b.folder}: no case in common (cases are paired by path, "
                    "then by file name; cases without unique names only by order, when both "
                    "list as many cases with the same labels)")


def compare_evaluations(first: str | os.PathLike[str], second: str | os.PathLike[str], *,
                        seed: int = 0) -> Comparison:
    """Compare evaluation B (``second``) with evaluation A (``first``) on their common cases.

    Raises:
        DataError: a folder that is not an evaluation, or no case in common.
        ConfigError: evaluations of different tasks or classes, or a case labelled differently.
    """
    a, b = _read(Path(first)), _read(Path(second))
    if a.task != b.task:
        raise ConfigError(f"{a.folder} is a {a.task} and {b.folder} a {b.task} evaluation")
    if sorted(a.columns) != sorted(b.columns):
        raise ConfigError(f"{a.folder} and {b.folder} score different classes "
                          f"({', '.join(a.columns)} / {', '.join(b.columns)})")
    rows_a, rows_b, how = _pairs(a, b)
    if a.labels:
        differ = [a.names[i] for i, j in zip(rows_a, rows_b, strict=True)
                  if a.labels[i] != b.labels[j]]
        if differ:
            raise ConfigError(f"{len(differ)} case(s) carry different labels in the two "
                              f"evaluations, e.g. {differ[0]}")
    only_first, only_second = len(a.names) - len(rows_a), len(b.names) - len(rows_b)
    if only_first or only_second:
        log.warning("comparing %d common cases; %d only in %s, %d only in %s", len(rows_a),
                    only_first, a.folder, only_second, b.folder)
    columns_a = {k: v[rows_a] for k, v in a.columns.items()}
    columns_b = {k: v[rows_b] for k, v in b.columns.items()}
    if a.task == "segmentation":
        metrics = _segmentation(columns_a, columns_b, seed)
    else:
        labels = [a.labels[i] for i in rows_a]
        metrics = _classification(columns_a, columns_b, labels, a.meta, b.meta, seed)
    return Comparison(task=a.task, first=_side(a), second=_side(b), n=len(rows_a),
                      matched_by=how, only_first=only_first, only_second=only_second,
                      metrics=tuple(metrics))


def _side(evaluation: _Evaluation) -> dict[str, Any]:
    pipeline = evaluation.meta.get("pipeline", {})
    return {"folder": str(evaluation.folder), "pipeline": pipeline.get("name"),
            "version": pipeline.get("version"),
            "weights_sha256": pipeline.get("weights_sha256"), "n": len(evaluation.names)}


def _paired(name: str, first: Statistic, second: Statistic, strata: list[np.ndarray],
            seed: int, *, higher_is_better: bool, first_better: int | None,
            second_better: int | None) -> MetricComparison:
    return MetricComparison(name=name, first=bootstrap_interval(first, strata, seed=seed),
                            second=bootstrap_interval(second, strata, seed=seed),
                            difference=bootstrap_interval(paired_difference(first, second),
                                                          strata, seed=seed),
                            higher_is_better=higher_is_better, first_better=first_better,
                            second_better=second_better)


def _mean_of(values: np.ndarray) -> Statistic:
    def mean(index: np.ndarray) -> float:
        chosen = values[index]
        chosen = chosen[~np.isnan(chosen)]
        return float(chosen.mean()) if len(chosen) else float("nan")

    return mean


def _segmentation(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                  seed: int) -> list[MetricComparison]:
    dice = [k for k in a if k.startswith("dice_")]
    per_case: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
    with np.errstate(all="ignore"):
        first_mean = np.nanmean(np.stack([a[k] for k in dice]), axis=0)
        second_mean = np.nanmean(np.stack([b[k] for k in dice]), axis=0)
    per_case["mean Dice"] = (first_mean, second_mean, True)
    for key in dice:
        per_case[f"Dice {key.removeprefix('dice_')}"] = (a[key], b[key], True)
    for key in (k for k in a if k.startswith("hd95_mm_")):
        per_case[f"HD95 {key.removeprefix('hd95_mm_')} (mm)"] = (a[key], b[key], False)
    strata = [np.arange(len(first_mean))]
    out = []
    for name, (x, y, higher) in per_case.items():
        gain = (y - x) if higher else (x - y)
        out.append(_paired(name, _mean_of(x), _mean_of(y), strata, seed,
                           higher_is_better=higher, first_better=int((gain < 0).sum()),
                           second_better=int((gain > 0).sum())))
    return out


def _classification(a: dict[str, np.ndarray], b: dict[str, np.ndarray], labels: list[str],
                    meta_a: dict[str, Any], meta_b: dict[str, Any],
                    seed: int) -> list[MetricComparison]:
    classes = [k.removeprefix("p_") for k in a]
    probs_a = np.stack([a[f"p_{c}"] for c in classes], axis=1)
    probs_b = np.stack([b[f"p_{c}"] for c in classes], axis=1)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the evaluated classes {classes}")
    truth = np.array([classes.index(label) for label in labels])
    pred_a = predicted_classes(probs_a, meta_a.get("threshold"))  # each one's own decision
    pred_b = predicted_classes(probs_b, meta_b.get("threshold"))
    right_a, right_b = pred_a == truth, pred_b == truth
    strata = [np.flatnonzero(truth == c) for c in range(len(classes))]
    first = _classification_statistics(probs_a, pred_a, truth, classes)
    second = _classification_statistics(probs_b, pred_b, truth, classes)
    out = []
    for name, (statistic, counted) in first.items():
        # cases one gets right and the other wrong, among those the metric counts
        out.append(_paired(name, statistic, second[name][0], strata, seed,
                           higher_is_better=True,
                           first_better=None if counted is None
                           else int((right_a & ~right_b & counted).sum()),
                           second_better=None if counted is None
                           else int((right_b & ~right_a & counted).sum())))
    return out


def _classification_statistics(probs: np.ndarray, pred: np.ndarray, truth: np.ndarray,
                               classes: list[str]
                               ) -> dict[str, tuple[Statistic, np.ndarray | None]]:
    """Each metric and the cases its "better on" counts count (None: a metric without a
    per-case value)."""
    k = len(classes)
    statistics: dict[str, tuple[Statistic, np.ndarray | None]] = {
        "accuracy": (lambda index: float(np.mean(pred[index] == truth[index])),
                     np.ones(len(truth), dtype=bool)),
        "balanced accuracy": (balanced_accuracy_statistic(pred, truth, k), None),
        "AUC": (auc_statistic(probs, truth), None)}
    if k == 2:  # the last class is the positive one, as in evaluate
        statistics[f"sensitivity ({classes[1]})"] = (recall_statistic(pred, truth, 1), truth == 1)
        statistics[f"specificity ({classes[0]})"] = (recall_statistic(pred, truth, 0), truth == 0)
    else:
        statistics.update({f"recall {name}": (recall_statistic(pred, truth, c), truth == c)
                           for c, name in enumerate(classes)})
    return statistics
