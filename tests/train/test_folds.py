"""Cross-validation folds and their ensemble, end to end on real chest radiographs: split,
train each fold (resumable), publish the ensemble, predict with PyTorch and ONNX, evaluate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medvision.cli.main import main
from medvision.config import load_pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.io import read_volume
from medvision.train import discover_items, split_items

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]


def _pipeline(tmp_path: Path, folds: int | None = 3) -> Path:
    folder = tmp_path / "chest-cv"
    folder.mkdir(parents=True)
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                              .read_text())
    settings["name"] = "chest-cv"
    settings["training"]["folds"] = folds
    settings["training"]["swa_epochs"] = 0
    settings["inference"]["tta_flips"] = []  # the mean below is then exact
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder



def test_folds_validate_every_patient_exactly_once(shared_data: Path, tmp_path: Path) -> None:
    pipeline = load_pipeline(_pipeline(tmp_path, folds=5))
    items = discover_items(pipeline, shared_data / "chest_xray" / "train")
    seen: list[str] = []
    for fold in range(5):
        split = split_items(pipeline, items, fold=fold)
        assert split.fold == fold
        train_groups = {i["group"] for i in split.train}
        val_groups = {i["group"] for i in split.val}
        assert not train_groups & val_groups
        assert {i["label"] for i in split.val} == {0, 1}  # stratified: both classes
        assert 0.17 < len(split.val) / len(items) < 0.23
        seen += sorted(val_groups)
    assert sorted(seen) == sorted({i["group"] for i in items})  # each group once
    again = split_items(pipeline, items, fold=2)
    assert [i["image"] for i in again.val] == [i["image"] for i in split_items(
        pipeline, items, fold=2).val]
    with pytest.raises(ConfigError, match="fold 5 needs training.folds"):
        split_items(pipeline, items, fold=5)
    with pytest.raises(ConfigError, match="needs training.folds"):
        split_items(load_pipeline(_pipeline(tmp_path / "x", folds=None)), items, fold=0)


def _probabilities(evaluation: Path) -> dict[str, list[float]]:
    import csv

    with (evaluation / "predictions.csv").open() as handle:
        return {row["item"]: [float(row["p_NORMAL"]), float(row["p_PNEUMONIA"])]
                for row in csv.DictReader(handle)}


@pytest.mark.slow  # tests/cli/test_reproduce.py trains folds into an ensemble in the default run
def test_fold_runs_become_an_ensemble(shared_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from medvision.infer import Predictor
    from medvision.models import ModelBundle
    from medvision.models.bundle import ensemble_digest

    folder, data = _pipeline(tmp_path), chest_subset(shared_data, tmp_path / "data", per_class=9)
    runs = [tmp_path / f"fold{i}" for i in range(3)]
    for i, run in enumerate(runs):
        assert main(["train", str(folder), "--data", str(data), "-o", str(run),
                     "--epochs", "1", "--fold", str(i)]) == 0
        assert f"fold {i} of 3: trained 1 epoch" in capsys.readouterr().out
        assert json.loads((run / "split.json").read_text())["fold"] == i
    with pytest.raises(ConfigError, match="resume it with --fold 1"):
        main(["--debug", "train", str(folder), "--data", str(data), "-o", str(runs[1]),
              "--epochs", "2", "--fold", "0", "--resume"])
    assert main(["train", str(folder), "--data", str(data), "-o", str(runs[1]),
                 "--epochs", "2", "--fold", "1", "--resume"]) == 0
    assert "fold 1 of 3: trained 2 epoch(s)" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        main(["--debug", "publish", str(runs[0]), str(tmp_path), "--pipeline", str(folder)])
    assert main(["publish", *map(str, reversed(runs)), "--pipeline", str(folder),
                 "--data", str(data)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["members"] == 3 and summary["folds"] == 3
    assert set(summary["fold_metrics"]) == {"fold 0", "fold 1", "fold 2"}
    assert "fold_metric_sd" in summary and summary["ood"]
    bundle = ModelBundle.load(folder)
    assert [m.fold for m in bundle.members] == [0, 1, 2]  # ordered by fold
    assert bundle.weights_sha256 == ensemble_digest(bundle.members)
    assert bundle.temperature == 1.0 and all(m.temperature != 1.0 for m in bundle.members)

    # the ensemble's probability is the mean of its members' calibrated probabilities
    predictor = Predictor.from_pipeline(folder)
    assert predictor.ensemble_size == 3
    image = sorted((data / "PNEUMONIA").iterdir())[0]
    prepared = predictor.prepare(read_volume(image))
    ensemble = predictor.predict(prepared).probabilities
    expected = np.zeros(2)
    for member in bundle.members:
        network = bundle.build_network(member.weights)
        with torch.no_grad():
            expected += torch.softmax(network(prepared.image) / member.temperature,
                                      dim=1)[0].numpy()
    np.testing.assert_allclose(ensemble, expected / 3, atol=1e-5)

    # ONNX: every member exported; the ONNX ensemble agrees
    assert main(["export", str(folder)]) == 0
    assert sorted(p.name for p in folder.glob("*.onnx")) == [
        "fold-1.onnx", "fold-2.onnx", "model.onnx"]
    onnx = Predictor.from_pipeline(folder, backend="onnx")
    np.testing.assert_allclose(onnx.predict(onnx.prepare(read_volume(image))).probabilities,
                               ensemble, atol=1e-4)

    # the explanation averages every member's map (each scaled to [0, 1]), whichever backend
    # predicts; `explanation.members: first` explains member 0 alone
    from medvision.explain import explain
    from medvision.explain.saliency import _normalise, attribute

    prediction = predictor.predict(prepared)
    cfg = predictor.pipeline.explanation
    own = [_normalise(attribute(bundle.build_network(m.weights), prepared.image,
                                prediction.target_index, cfg, cfg.method)[0][0].numpy())
           for m in bundle.members]
    assert not np.allclose(own[0], own[1], atol=1e-3)  # the members differ
    saliency = explain(predictor, prepared, prediction)
    np.testing.assert_allclose(saliency.model_space, _normalise(np.mean(own, axis=0)), atol=1e-5)
    assert saliency.params["members"] == 3 and "mean of the 3 members' maps" in saliency.target
    np.testing.assert_allclose(explain(onnx, prepared, prediction).model_space,
                               saliency.model_space, atol=1e-5)
    first = cfg.model_copy(update={"members": "first"})
    pipeline = bundle.pipeline.model_copy(update={"explanation": first})
    alone = explain(Predictor.from_bundle(dataclasses.replace(bundle, pipeline=pipeline)),
                    prepared, prediction)
    np.testing.assert_allclose(alone.model_space, own[0], atol=1e-5)
    assert alone.params["members"] == 1 and "first member only" in alone.target

    # evaluate: one fold's member on its own validation side, and the ensemble
    out = tmp_path / "eval-fold1"
    assert main(["evaluate", str(folder), "--data", str(data), "-o", str(out), "--split", "val",
                 "--fold", "1", "--weights", str(runs[1] / "best.safetensors")]) == 0
    expected_val = split_items(load_pipeline(folder), discover_items(load_pipeline(folder), data),
                               fold=1).val
    assert json.loads((out / "metrics.json").read_text())["n"] == len(expected_val)
    fold1 = _probabilities(out)
    # out-of-fold: every case once, scored by the member that never trained on it
    oof = tmp_path / "eval-oof"
    with pytest.raises(ConfigError, match="no --split"):
        main(["--debug", "evaluate", str(folder), "--data", str(data), "-o", str(oof),
              "--out-of-fold", "--split", "val"])
    assert main(["evaluate", str(folder), "--data", str(data), "-o", str(oof),
                 "--out-of-fold"]) == 0
    assert "fold spread: auc" in capsys.readouterr().out
    metrics = json.loads((oof / "metrics.json").read_text())
    assert metrics["n"] == 18
    assert metrics["pipeline"]["weights_sha256"] == bundle.weights_sha256
    assert [metrics["per_fold"][f"fold {i}"]["n"] for i in range(3)] == [
        len(split_items(load_pipeline(folder), discover_items(load_pipeline(folder), data),
                        fold=i).val) for i in range(3)]
    assert "fold 2 (" in (oof / "summary.html").read_text()
    pooled = _probabilities(oof)
    assert sorted(pooled) == sorted(str(p) for p in data.rglob("*.jpeg"))
    # fold 1's cases get the fold-1 member's predictions: a temperature changes neither the
    # predicted class nor the ranking
    assert {n: pooled[n][1] >= 0.5 for n in fold1} == {n: p[1] >= 0.5 for n, p in fold1.items()}
    assert metrics["per_fold"]["fold 1"]["auc"]["value"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["auc"]["value"])
    single = tmp_path / "single"  # one fold's run published alone: not an ensemble
    shutil.copytree(folder, single, ignore=shutil.ignore_patterns("*.safetensors", "*.json"))
    assert main(["publish", str(runs[1]), "--pipeline", str(single)]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match="not a cross-validation ensemble"):
        main(["--debug", "evaluate", str(single), "--data", str(data), "-o",
              str(tmp_path / "x"), "--out-of-fold"])
    out = tmp_path / "eval-ensemble"
    assert main(["evaluate", str(folder), "--data", str(data), "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 18 and 0.0 <= metrics["auc"]["value"] <= 1.0

    # a report names the ensemble, not one member
    report_dir = tmp_path / "analysis"
    assert main(["analyze", str(image), "--pipeline", str(folder), "-o", str(report_dir),
                 "--faithfulness"]) == 0
    report = json.loads(next(report_dir.rglob("report.json")).read_text())
    assert report["pipeline"]["weights_sha256"] == bundle.weights_sha256
    assert report["saliency"]["params"]["members"] == 3
    assert report["saliency"]["faithfulness"]  # scored through the whole ensemble

    # a changed member is refused, and a single run published over it replaces the ensemble
    member = folder / "fold-2.safetensors"
    member.write_bytes(member.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="changed since the ensemble was written"):
        ModelBundle.load(folder)
    assert main(["publish", str(runs[0]), "--pipeline", str(folder)]) == 0
    assert not (folder / "ensemble.json").exists() and not member.exists()
    assert ModelBundle.load(folder).members == ()
    shutil.rmtree(report_dir)
