"""Evaluation metrics against values worked out by hand on small hand-made masks and boxes
(an oracle independent of the code under test: not values the same code wrote earlier)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medvision.config import load_pipeline
from medvision.evaluate.run import _segmentation
from medvision.metrics import detection_metrics

REPO = Path(__file__).resolve().parents[2]


class _KnownMasks:
    """Stands where a predictor stands in ``_segmentation``: it yields, for each item, the
    prediction and the truth the item names (the network is not what is tested here)."""

    def __init__(self, cases: list[tuple[np.ndarray, np.ndarray]], spacing: tuple[float, ...]):
        self.pipeline = load_pipeline(REPO / "pipelines" / "hippocampus-seg")
        self.cases = cases
        self.spacing = spacing

    def run_items(self, items: Any, batch_size: int) -> Iterator[tuple[Any, Any, Any]]:
        from monai.data import MetaTensor

        classes = len(self.pipeline.classes)
        affine = torch.diag(torch.tensor([*self.spacing, 1.0, 1.0][:4]))
        for item in items:
            predicted, truth = self.cases[item["index"]]
            logits = torch.nn.functional.one_hot(torch.as_tensor(predicted).long(), classes)
            logits = logits.movedim(-1, 0)[None].float()
            image = MetaTensor(torch.zeros(1, 1, *predicted.shape), affine=affine[None])
            yield {"image": image}, logits, torch.as_tensor(truth)[None, None]


def _square(shape: tuple[int, int], rows: slice, columns: slice, label: int = 1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.int64)
    mask[rows, columns] = label
    return mask


def test_dice_hd95_and_volume_of_a_shifted_square(tmp_path: Path) -> None:
    # truth: a 5x5 square of class 1 on pixels of 2 mm (rows) x 1 mm (columns)
    truth = _square((20, 20), slice(5, 10), slice(5, 10))
    # the prediction one row lower: 20 of its 25 pixels overlap the truth
    lower = _square((20, 20), slice(6, 11), slice(5, 10))
    # and one column to the right
    right = _square((20, 20), slice(5, 10), slice(6, 11))
    known = _KnownMasks([(lower, truth), (right, truth)], spacing=(2.0, 1.0, 1.0))
    items = [{"image": "lower", "index": 0}, {"image": "right", "index": 1}]
    metrics, _, (dice, hd95) = _segmentation([(known, items)], tmp_path)  # type: ignore[list-item]
    # Dice = 2 * 20 / (25 + 25) in both cases
    assert dice[:, 0] == pytest.approx([0.8, 0.8])
    # every surface point is 0 or one step away, half of them one step: the 95th percentile
    # is one step, 2 mm along rows and 1 mm along columns
    assert hd95[:, 0] == pytest.approx([2.0, 1.0])
    assert metrics["dice_per_class"]["anterior"]["value"] == pytest.approx(0.8)
    assert metrics["hd95_per_class"]["anterior"]["value"] == pytest.approx(1.5)
    rows = list(csv.DictReader((tmp_path / "cases.csv").open()))
    # 25 pixels of 2 x 1 x 1 mm = 50 mm^3 = 0.05 mL, predicted and true alike
    assert [float(r["volume_ml_anterior"]) for r in rows] == pytest.approx([0.05, 0.05])
    assert [float(r["reference_volume_ml_anterior"]) for r in rows] == pytest.approx(
        [0.05, 0.05])


def test_map_count_error_and_recall_of_hand_made_boxes() -> None:
    truths = [{"boxes": np.array([[10, 10, 30, 30]]), "labels": np.array([0])},
              {"boxes": np.array([[50, 50, 70, 70]]), "labels": np.array([0])}]
    predictions = [
        # image 1: the true box found (0.9) and a false one (0.8) far from it
        {"boxes": np.array([[10, 10, 30, 30], [80, 80, 95, 95]]), "labels": np.array([0, 0]),
         "scores": np.array([0.9, 0.8])},
        # image 2: the true box missed, a false one (0.7) that barely touches it (IoU < 0.5)
        {"boxes": np.array([[65, 65, 85, 85]]), "labels": np.array([0]),
         "scores": np.array([0.7])},
    ]
    found = detection_metrics(predictions, truths, ["cell"], intervals=False)
    # ranked: hit (P 1, R 0.5), miss, miss: COCO's 101-point interpolated precision is 1 at
    # recall 0, 0.01 ... 0.50 (51 points) and 0 above, so AP = 51 / 101
    assert found["map_50"]["value"] == pytest.approx(51 / 101, abs=1e-6)
    assert found["per_class"]["cell"]["ap_50"]["value"] == pytest.approx(51 / 101, abs=1e-6)
    # boxes scoring 0.5 or more: 2 found where 1 is true, then 1 where 1 is true
    assert found["count_mae"]["value"] == pytest.approx(0.5)
    # two false positives are allowed at 1 per image over 2 images: 1 of 2 boxes found
    assert found["recall_at_1_fp_per_image"]["value"] == pytest.approx(0.5)
    # a perfect detector scores 1 everywhere
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": np.array([0.99])}
               for t in truths]
    best = detection_metrics(perfect, truths, ["cell"], intervals=False)
    assert best["map_50"]["value"] == pytest.approx(1.0)
    assert best["count_mae"]["value"] == 0.0
