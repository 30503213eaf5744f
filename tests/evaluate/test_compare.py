"""`medvision compare`: two real evaluations of the same cases, paired case by case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medvision.cli.main import main
from medvision.errors import ConfigError, DataError
from medvision.evaluate.compare import compare_evaluations

from conftest import chest_subset, hippocampus_subset

REPO = Path(__file__).resolve().parents[2]


def _evaluate(pipeline: str, data: Path, out: Path, *extra: str) -> dict:
    assert main(["evaluate", "--pipeline", pipeline, "--data", str(data), "-o", str(out),
                 "-q", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_segmentation_ensemble_against_its_first_member(shared_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 4))
    shipped = REPO / "pipelines" / "hippocampus-seg"
    first = _evaluate("hippocampus-seg", data, tmp_path / "single", "--weights",
                      str(shipped / "model.safetensors"))
    second = _evaluate("hippocampus-seg", data, tmp_path / "ensemble")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "single"), str(tmp_path / "ensemble"),
                 "-o", str(tmp_path / "compare")]) == 0
    table = capsys.readouterr().out
    assert "| mean Dice |" in table and "4 cases paired by path" in table
    saved = json.loads((tmp_path / "compare" / "comparison.json").read_text())
    assert (tmp_path / "compare" / "comparison.md").read_text() == table
    metrics = {m["name"]: m for m in saved["metrics"]}
    dice = metrics["mean Dice"]
    assert dice["first"]["value"] == pytest.approx(first["dice"]["value"], abs=1e-4)
    assert dice["second"]["value"] == pytest.approx(second["dice"]["value"], abs=1e-4)
    assert dice["difference"]["value"] == pytest.approx(
        second["dice"]["value"] - first["dice"]["value"], abs=1e-4)
    low, high = dice["difference"]["ci95"]
    assert low <= dice["difference"]["value"] <= high
    assert dice["first_better"] + dice["second_better"] <= 4
    for name in ("anterior", "posterior"):
        assert metrics[f"Dice {name}"]["second"]["value"] == pytest.approx(
            second["dice_per_class"][name]["value"], abs=1e-4)
        assert not metrics[f"HD95 {name} (mm)"]["higher_is_better"]

    # the same evaluation against itself: no difference, no case better
    same = compare_evaluations(tmp_path / "single", tmp_path / "single")
    assert all(m.difference["value"] == 0 and m.first_better == m.second_better == 0
               for m in same.metrics)

    # cases on one side only are left out and counted; another folder pairs by file name
    (data / "images" / sorted((data / "images").iterdir())[0].name).unlink()
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, symlinks=True)
    _evaluate("hippocampus-seg", moved, tmp_path / "three")
    partial = compare_evaluations(tmp_path / "single", tmp_path / "three")
    assert (partial.n, partial.only_first, partial.only_second) == (3, 1, 0)
    assert partial.matched_by == "file name"

    # other cases are never paired by their order; cases without names (arrays) only so
    renamed = tmp_path / "renamed"
    shutil.copytree(tmp_path / "single", renamed)
    cases = (renamed / "cases.csv").read_text().splitlines()
    (renamed / "cases.csv").write_text("\n".join(
        [cases[0], *(f"other_{i}.nii.gz," + line.split(",", 1)[1]
                     for i, line in enumerate(cases[1:]))]) + "\n")
    with pytest.raises(DataError, match="no case in common"):
        compare_evaluations(tmp_path / "single", renamed)

    # a truncated or empty per-case file says so
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "single", broken)
    table = (broken / "cases.csv").read_bytes()
    (broken / "cases.csv").write_bytes(table[:len(table) - 40])
    with pytest.raises(DataError, match="cases.csv: unreadable"):
        compare_evaluations(tmp_path / "single", broken)
    (broken / "cases.csv").write_bytes(b"")
    with pytest.raises(DataError, match="cases.csv: no cases"):
        compare_evaluations(tmp_path / "single", broken)
    for folder in (renamed, tmp_path / "ensemble"):
        lines = (folder / "cases.csv").read_text().splitlines()
        (folder / "cases.csv").write_text("\n".join(
            [lines[0], *("," + line.split(",", 1)[1] for line in lines[1:])]) + "\n")
    unnamed = compare_evaluations(renamed, tmp_path / "ensemble")
    assert unnamed.matched_by == "order" and unnamed.n == 4
    assert unnamed.metrics[0].difference["value"] == pytest.approx(
        dice["difference"]["value"], abs=1e-4)


def test_classification_counts_discordant_cases(shared_data: Path, tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=6)
    shipped = REPO / "pipelines" / "chest-xray-pneumonia"
    _evaluate("chest-xray-pneumonia", data, tmp_path / "fold1", "--weights",
              str(shipped / "fold-1.safetensors"))
    _evaluate("chest-xray-pneumonia", data, tmp_path / "ensemble")
    comparison = compare_evaluations(tmp_path / "fold1", tmp_path / "ensemble")
    metrics = {m.name: m for m in comparison.metrics}
    assert set(metrics) == {"accuracy", "balanced accuracy", "AUC", "sensitivity (PNEUMONIA)",
                            "specificity (NORMAL)"}
    rows = [line.split(",") for line in
            (tmp_path / "fold1" / "predictions.csv").read_text().splitlines()[1:]]
    right = [(float(r[3]) >= 0.5) == (r[1] == "PNEUMONIA") for r in rows]
    assert metrics["accuracy"].first["value"] == pytest.approx(np.mean(right))
    accuracy = metrics["accuracy"]
    assert accuracy.difference["value"] == pytest.approx(
        (accuracy.second_better - accuracy.first_better) / 12)
    assert metrics["AUC"].first_better is None

    # B: fold 1's file with two pneumonia cases and one normal case it got right made wrong
    worse = tmp_path / "worse"
    shutil.copytree(tmp_path / "fold1", worse)
    flipped = {"PNEUMONIA": 2, "NORMAL": 1}
    for row, ok in zip(rows, right, strict=True):
        if ok and flipped[row[1]]:
            flipped[row[1]] -= 1
            row[2], row[3] = row[3], row[2]  # the two probabilities swapped
    assert flipped == {"PNEUMONIA": 0, "NORMAL": 0}
    (worse / "predictions.csv").write_text(
        "item,label,p_NORMAL,p_PNEUMONIA\n" + "".join(",".join(r) + "\n" for r in rows))
    metrics = {m.name: m for m in compare_evaluations(tmp_path / "fold1", worse).metrics}
    assert (metrics["accuracy"].first_better, metrics["accuracy"].second_better) == (3, 0)
    assert metrics["accuracy"].difference["value"] == pytest.approx(-3 / 12)
    assert metrics["sensitivity (PNEUMONIA)"].first_better == 2
    assert metrics["specificity (NORMAL)"].first_better == 1
    assert metrics["specificity (NORMAL)"].difference["value"] == pytest.approx(-1 / 6)

    # a case labelled differently, another task, a folder that is no evaluation
    predictions = tmp_path / "ensemble" / "predictions.csv"
    text = predictions.read_text().splitlines()
    swapped = text[1].replace(",NORMAL,", ",PNEUMONIA,") if ",NORMAL," in text[1] else \
        text[1].replace(",PNEUMONIA,", ",NORMAL,")
    predictions.write_text("\n".join([text[0], swapped, *text[2:]]) + "\n")
    with pytest.raises(ConfigError, match="different labels"):
        compare_evaluations(tmp_path / "fold1", tmp_path / "ensemble")
    with pytest.raises(DataError, match="not an evaluation folder"):
        compare_evaluations(tmp_path / "fold1", tmp_path / "data")
    assert main(["compare", str(tmp_path / "fold1"), str(tmp_path / "data")]) == 1
