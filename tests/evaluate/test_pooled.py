"""Pooling several scoring parts (out-of-fold evaluation) for segmentation: the pooled Dice is
the mean over every case of every part, and each part keeps its own."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medvision.evaluate.run import _evaluate, evaluate
from medvision.infer import Predictor
from medvision.train import discover_items


def test_parts_are_pooled_case_by_case(shared_data: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_pipeline("hippocampus-seg")
    items = discover_items(predictor.pipeline, shared_data / "hippocampus")[:5]
    whole = evaluate(predictor, items, tmp_path / "whole")
    pooled = _evaluate([(predictor, items[:2]), (predictor, items[2:])], tmp_path / "pooled",
                       force=False, auditor=None, audit_inputs=None, folds=[3, 7])
    assert pooled["n"] == 5 and pooled["dice"]["value"] == pytest.approx(whole["dice"]["value"])
    with (tmp_path / "pooled" / "cases.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["item"] for r in rows] == [i["image"] for i in items]
    per_case = [(float(r["dice_anterior"]) + float(r["dice_posterior"])) / 2 for r in rows]
    assert pooled["per_fold"]["fold 3"]["n"] == 2 and pooled["per_fold"]["fold 7"]["n"] == 3
    assert pooled["per_fold"]["fold 3"]["dice"]["value"] == pytest.approx(
        np.mean(per_case[:2]), abs=1e-3)
    assert pooled["per_fold"]["dice_mean"] == pytest.approx(
        (np.mean(per_case[:2]) + np.mean(per_case[2:])) / 2, abs=1e-3)
    saved = json.loads((tmp_path / "pooled" / "metrics.json").read_text())
    assert saved["split"].startswith("out-of-fold")


def test_a_fold_with_no_readable_case_is_left_out_and_the_rest_scored(
        shared_data: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_pipeline("hippocampus-seg")
    items = discover_items(predictor.pipeline, shared_data / "hippocampus")[:2]
    source = Path(items[0]["image"])
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes()[:200])  # truncated gzip
    unreadable = [{**items[0], "image": str(broken)}]
    pooled = _evaluate([(predictor, unreadable), (predictor, items)], tmp_path / "pooled",
                       force=False, auditor=None, audit_inputs=None, folds=[0, 1])
    assert pooled["n"] == 2 and list(pooled["per_fold"])[:1] == ["fold 1"]
    assert "fold 0" not in pooled["per_fold"]
    assert [s["path"] for s in pooled["skipped_items"]] == [str(broken)]
