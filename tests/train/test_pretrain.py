"""Self-supervised pretraining on real images, and its weights as a start for training."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from medvision.cli.main import main
from medvision.errors import ConfigError

from conftest import chest_subset


def test_contrastive_pretraining_resumes_and_starts_a_classifier(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=5)
    run = tmp_path / "ssl"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local MLflow store, when installed
    tracking = ["--tracking", store] if importlib.util.find_spec("mlflow") else []
    args = ["pretrain", "chest-xray-pneumonia", "--data", str(data), "-o", str(run),
            "--batch-size", "4", *tracking]
    assert main([*args, "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert "pretrained (contrastive) 1 epoch(s) on 10 image(s)" in out
    assert "pretraining epoch 1/1: loss " in err
    with pytest.raises(ConfigError, match="not empty"):
        main(["--debug", *args, "--epochs", "1"])
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    if tracking:  # one MLflow run over both sessions, each epoch once
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [
            (1, pytest.approx(float(rows[0]["loss"]))), (2, pytest.approx(float(rows[1]["loss"])))]
        tracked = client.get_run(run_id).data
        assert tracked.params["cli.method"] == "contrastive"
        assert tracked.tags["medvision.kind"] == "pretrain"
        assert len(tracked.tags["medvision.weights_sha256"]) == 64
    from safetensors.torch import load_file

    tensors = load_file(str(run / "pretrained.safetensors"))
    assert "conv1.weight" in tensors and not any(k.startswith("fc.") for k in tensors)
    target = tmp_path / "run"
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(target),
                 "--epochs", "1", "--init-from", str(run / "pretrained.safetensors")]) == 0
    init = json.loads((target / "init.json").read_text())
    assert init["loaded"] == len(tensors) and not init["skipped"]
    assert sorted(init["fresh"]) == ["fc.bias", "fc.weight"]  # only the head starts fresh


def test_masked_pretraining_for_a_segmentation_network(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for part in ("images", "labels"):
        (data / part).mkdir(parents=True)
    for path in sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[:4]:
        (data / "images" / path.name).symlink_to(path)
        (data / "labels" / path.name).symlink_to(shared_data / "hippocampus" / "labels" / path.name)
    run = tmp_path / "ssl"
    assert main(["pretrain", "hippocampus-seg", "--data", str(data), "-o", str(run),
                 "--epochs", "1", "--batch-size", "2"]) == 0
    assert json.loads((run / "images.json").read_text()) == {"count": 4, "method": "masked"}
    with pytest.raises(ConfigError, match="contrastive pretraining needs a classification"):
        main(["--debug", "pretrain", "hippocampus-seg", "--data", str(data), "-o",
              str(tmp_path / "x"), "--epochs", "1", "--method", "contrastive"])
    target = tmp_path / "run"
    assert main(["train", "hippocampus-seg", "--data", str(data), "-o", str(target),
                 "--epochs", "1", "--init-from", str(run / "pretrained.safetensors")]) == 0
    init = json.loads((target / "init.json").read_text())
    # everything loads but the last convolution, whose output channels differ (2 vs 3)
    assert init["loaded"] > 10
    assert init["skipped"] and all(s["reason"] == "shape differs" for s in init["skipped"])
