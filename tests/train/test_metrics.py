"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medvision.metrics import (
    binary_auc,
    bootstrap_interval,
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
    first = bootstrap_interval(lambda i: float(values[i].mean()), [np.arange(200)], seed=3)
    lo, hi = first["ci95"]
    assert first["ci_method"] == "bca"
    assert lo < values.mean() < hi and hi - lo < 0.5
    assert first == bootstrap_interval(lambda i: float(values[i].mean()), [np.arange(200)],
                                       seed=3)


def test_perfect_small_sample_gets_a_wilson_interval_not_a_point() -> None:
    """11/11 correct: 1.000 with 95% CI 0.741-1.000 (Wilson), never 1.000-1.000."""
    p1 = np.array([0.1] * 5 + [0.9] * 6)
    probs = np.stack([1 - p1, p1], axis=1)
    labels = np.array([0] * 5 + [1] * 6)
    m = classification_metrics(probs, labels, ["neg", "pos"])
    assert m["accuracy"]["value"] == 1.0
    assert m["accuracy"]["ci_method"] == "wilson"
    assert m["accuracy"]["ci95"][0] == pytest.approx(0.7412, abs=1e-4)
    assert m["recall"]["ci95"][0] < 1.0 and m["specificity"]["ci95"][0] < 1.0
    assert m["per_class"]["pos"]["recall"]["ci_method"] == "wilson"


def test_auc_is_monai_and_stratified_resamples_keep_both_classes() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 90 + [1] * 10)
    p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 100), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(probs, labels, ["neg", "pos"])
    # the AUC is MONAI's, and both equal the rank statistic worked out directly: the share of
    # (positive, negative) pairs ordered right, ties counting half
    import torch
    from monai.metrics import compute_roc_auc

    monai_auc = float(compute_roc_auc(torch.tensor(p1), torch.tensor(labels)))
    pos, neg = p1[labels == 1], p1[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert m["auc"]["value"] == pytest.approx(monai_auc) == pytest.approx(float(pairs))
    assert m["auc"]["ci_method"] in ("bca", "percentile")
    lo, hi = m["auc"]["ci95"]
    assert np.isfinite(lo) and np.isfinite(hi)  # never a resample without positives
    assert lo <= m["auc"]["value"] <= hi

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
