"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medvision.metrics import (
    binary_auc,
    bootstrap,
    classification_metrics,
    expected_calibration_error,
    segmentation_metrics,
)
from medvision.models.calibration import fit_temperature


def test_binary_metrics_by_hand() -> None:
    # 6 cases; truth 0,0,0,1,1,1; p(positive) below. At 0.5: predictions 0,1,0,1,1,0.
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.7, 0.4])
    probs = np.stack([1 - p1, p1], axis=1)
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = classification_metrics(probs, labels, ["neg", "pos"])
    # TP=2 (0.8, 0.7), FP=1 (0.6), FN=1 (0.4), TN=2
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["precision"]["value"] == pytest.approx(2 / 3)
    assert m["recall"]["value"] == pytest.approx(2 / 3)
    assert m["specificity"]["value"] == pytest.approx(2 / 3)
    assert m["f1"]["value"] == pytest.approx(2 / 3)
    # AUC: pairs (pos > neg) among 9: 0.8 beats all 3, 0.7 beats all 3, 0.4 beats 0.1 and 0.3
    assert m["auc"]["value"] == pytest.approx(8 / 9)
    assert m["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 1], [1, 2]]
    assert m["per_class"]["pos"]["support"] == 3
    lo, hi = m["accuracy"]["ci95"]
    assert 0 <= lo <= 4 / 6 <= hi <= 1


def test_threshold_changes_predictions() -> None:
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    labels = np.array([1, 1])
    assert classification_metrics(probs, labels, ["a", "b"], threshold=0.25)["recall"]["value"] == 1.0
    assert classification_metrics(probs, labels, ["a", "b"])["recall"]["value"] == 0.5


def test_auc_ties_and_single_class() -> None:
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(binary_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_ece_by_hand() -> None:
    # Two cases at confidence 0.9 (one right) and two at 0.6 (both right):
    # bin 0.9: |0.5 - 0.9| * 0.5 = 0.2; bin 0.6: |1.0 - 0.6| * 0.5 = 0.2
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_bootstrap_interval_contains_the_mean_and_is_reproducible() -> None:
    values = np.random.default_rng(0).normal(5, 1, 200)
    ci = bootstrap(lambda i: float(values[i].mean()), len(values), seed=3)
    assert ci[0] < values.mean() < ci[1]
    assert ci == bootstrap(lambda i: float(values[i].mean()), len(values), seed=3)
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)


def test_segmentation_summary() -> None:
    dice = np.array([[0.8, 0.6], [0.9, 0.7]])
    hd = np.array([[1.0, 2.0], [3.0, 4.0]])
    m = segmentation_metrics(dice, hd, ["a", "b"])
    assert m["dice"]["value"] == pytest.approx(0.75)
    assert m["dice_per_class"]["b"]["value"] == pytest.approx(0.65)
    assert m["hd95_per_class"]["a"]["value"] == pytest.approx(2.0)


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = np.array([rng.choice(3, p=np.exp(row) / np.exp(row).sum()) for row in true_logits])
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)
