"""Training end to end on real files: tiny subsets, one or two epochs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medvision.cli.main import main
from medvision.config import load_pipeline
from medvision.errors import ConfigError
from medvision.train import discover_items, split_items

from conftest import chest_subset, hippocampus_subset


def test_chest_split_is_grouped_by_patient(shared_data: Path) -> None:
    pipeline = load_pipeline("chest-xray-pneumonia")
    items = discover_items(pipeline, shared_data / "chest_xray" / "train")
    assert len(items) == 5216
    split = split_items(pipeline, items)
    train_groups = {i["group"] for i in split.train}
    val_groups = {i["group"] for i in split.val}
    assert not train_groups & val_groups
    assert 0.1 < len(split.val) / len(items) < 0.2
    assert {i["label"] for i in split.val} == {0, 1}
    again = split_items(pipeline, items)
    assert [i["image"] for i in again.val] == [i["image"] for i in split.val]


def test_train_one_epoch_then_resume(shared_data: Path, tmp_path: Path, capsys) -> None:
    data = chest_subset(shared_data, tmp_path / "chest")
    run = tmp_path / "run"
    args = ["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    assert "best epoch 1" in capsys.readouterr().out
    for name in ("best.safetensors", "last.safetensors", "optimizer.safetensors", "state.json",
                 "metrics.csv", "pipeline.yaml", "split.json"):
        assert (run / name).is_file(), name
    with pytest.raises(ConfigError, match="not empty"):
        main(["--debug", *args, "--epochs", "1"])
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert 0.0 <= float(rows[-1]["val_auc"]) <= 1.0
    assert all(0.0 <= float(r["data_wait_share"]) <= 1.0 for r in rows)
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 2 and state["optimizer_param_groups"][0]["lr"] >= 0


def test_npz_official_splits(shared_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "adrenal-3d", "--data",
                 str(shared_data / "adrenalmnist3d" / "adrenalmnist3d_64.npz"), "-o", str(run),
                 "--epochs", "1", "--limit", "24"]) == 0
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert 0.0 <= float(row["val_accuracy"]) <= 1.0


def test_train_then_evaluate_classification(shared_data: Path, tmp_path: Path, capsys) -> None:
    data = chest_subset(shared_data, tmp_path / "chest", per_class=10)
    run = tmp_path / "run"
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(run),
                 "--epochs", "1"]) == 0
    calibration = json.loads((run / "calibration.json").read_text())
    assert 0.05 <= calibration["temperature"] <= 20
    out = tmp_path / "eval"
    assert main(["evaluate", "chest-xray-pneumonia", "--data", str(data), "-o", str(out),
                 "--weights", str(run / "best.safetensors")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "auc", "ece"):
        value = metrics[key]
        assert {"value", "ci95", "ci_method"} <= set(value), key
        if value["value"] == value["value"]:  # not NaN
            assert value["ci95"][0] <= value["value"] + 1e-9 <= value["ci95"][1] + 2e-9, key
    matrix = metrics["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == metrics["n"] == 20
    assert set(metrics["per_class"]) == {"NORMAL", "PNEUMONIA"}
    for png in ("roc.png", "pr.png", "confusion_matrix.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    assert "summary.html" in capsys.readouterr().out
    page = (out / "summary.html").read_text()
    assert "roc.png" in page and "Not for diagnostic use" in page


def test_train_then_evaluate_segmentation(shared_data: Path, tmp_path: Path) -> None:
    data = hippocampus_subset(shared_data, tmp_path / "hippo", slice(0, 5))
    run = tmp_path / "run"
    assert main(["train", "hippocampus-seg", "--data", str(data), "-o", str(run),
                 "--epochs", "1"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "hippocampus-seg", "--data", str(data), "-o", str(out),
                 "--weights", str(run / "best.safetensors")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and set(metrics["dice_per_class"]) == {"anterior", "posterior"}
    assert set(metrics["hd95_per_class"]) == {"anterior", "posterior"}
    assert (out / "dice_boxplot.png").is_file()


def test_transfer_learning_with_frozen_layers(shared_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = chest_subset(shared_data, tmp_path / "chest", per_class=6)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(first),
                 "--epochs", "1"]) == 0
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(second),
                 "--epochs", "1", "--init-from", str(first / "best.safetensors"),
                 "--freeze", "conv1", "layer1"]) == 0
    before = load_file(str(first / "best.safetensors"))
    after = load_file(str(second / "last.safetensors"))
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])


def test_init_from_colour_weights_names_every_tensor_and_converts_the_first_conv(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 3-channel, 4-class network's weights (written as a torchvision checkpoint would be
    converted) into the 1-channel, 2-class chest model."""
    import logging

    from safetensors.torch import load_file

    from medvision.config import load_pipeline
    from medvision.models import build_model
    from medvision.train.loop import _init_from
    from medvision.train.pretrained import to_safetensors

    pipeline = load_pipeline("chest-xray-pneumonia")
    colour = pipeline.model_copy(update={"in_channels": 3,
                                         "classes": ("a", "b", "c", "d")})
    source = tmp_path / "colour.safetensors"
    to_safetensors(build_model(colour).state_dict(), source)
    model = build_model(pipeline)
    with caplog.at_level(logging.WARNING):
        _init_from(model, source, tmp_path, rgb_to_grey=True)
    report = json.loads((tmp_path / "init.json").read_text())
    assert [c["tensor"] for c in report["converted"]] == ["conv1.weight"]
    assert {s["tensor"] for s in report["skipped"]} == {"fc.weight", "fc.bias"}
    assert "fc.weight" in caplog.text and "conv1.weight converted" in caplog.text
    original = load_file(str(source))["conv1.weight"]
    assert torch.allclose(model.state_dict()["conv1.weight"], original.sum(dim=1, keepdim=True))
    model = build_model(pipeline)
    _init_from(model, source, tmp_path)  # without conversion the first conv is skipped, named
    skipped = {s["tensor"] for s in json.loads((tmp_path / "init.json").read_text())["skipped"]}
    assert "conv1.weight" in skipped


def test_weight_average_of_last_epochs(shared_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """swa_epochs: the last epochs run at the constant averaging rate, their weights are
    averaged (batch-norm statistics recomputed) and the average becomes best.safetensors."""
    import yaml
    from safetensors.torch import load_file

    data = chest_subset(shared_data, tmp_path / "chest", per_class=6)
    spec = yaml.safe_load((Path("pipelines") / "chest-xray-pneumonia" / "pipeline.yaml")
                          .read_text())
    spec["preprocess"]["size"] = [64, 64]
    spec["training"].update(epochs=3, swa_epochs=2, swa_lr=0.5, early_stopping_patience=1)
    spec["schedule"] = {"name": "cosine", "warmup_epochs": 0}
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["train", str(pipeline_file), "--data", str(data), "-o", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "weights averaged over the last 2 epoch(s)" in printed  # not "best epoch N"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 3  # early stopping does not cut the averaging epochs short
    lr = spec["optimizer"]["lr"]
    # metrics.csv logs the rate each epoch trained at: the first at lr, the two averaging
    # epochs at swa_lr * lr (it used to log the next epoch's rate)
    assert float(rows[0]["lr"]) == pytest.approx(lr)
    assert float(rows[1]["lr"]) == pytest.approx(0.5 * lr)
    assert float(rows[2]["lr"]) == pytest.approx(0.5 * lr)
    state = json.loads((run / "state.json").read_text())
    assert state["swa_count"] == 2 and 0.0 <= state["swa"]["accuracy"] <= 1.0
    assert state["best_metric"] == state["swa"]["loss"]
    best, last = load_file(str(run / "best.safetensors")), load_file(str(run / "last.safetensors"))
    average = load_file(str(run / "swa.safetensors"))
    assert (run / "best_epoch.safetensors").is_file()
    assert torch.equal(best["layer4.0.conv1.weight"], average["layer4.0.conv1.weight"])
    assert not torch.equal(best["layer4.0.conv1.weight"], last["layer4.0.conv1.weight"])
    # batch-norm statistics were recomputed for the averaged weights, not averaged
    assert not torch.allclose(best["bn1.running_mean"], average["bn1.running_mean"])
    assert (run / "calibration.json").is_file()
    # a finished run resumes to nothing new: the average is not folded in again
    assert main(["train", str(pipeline_file), "--data", str(data), "-o", str(run),
                 "--resume"]) == 0
    assert torch.equal(load_file(str(run / "best.safetensors"))["layer4.0.conv1.weight"],
                       best["layer4.0.conv1.weight"])


def test_running_average_is_exact_and_restartable(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from medvision.train.loop import _accumulate_average

    model = torch.nn.Linear(3, 2)
    seen = []
    count = 0
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(value)
        count = _accumulate_average(model, tmp_path / "swa.safetensors", count)
    assert count == 3
    average = load_file(str(tmp_path / "swa.safetensors"))
    assert torch.allclose(average["weight"], torch.full((2, 3), 3.0))
    # a count of 0 starts afresh even if an old file is there
    assert _accumulate_average(model, tmp_path / "swa.safetensors", 0) == 1
    assert torch.allclose(load_file(str(tmp_path / "swa.safetensors"))["weight"],
                          torch.full((2, 3), 6.0))


def test_corrupt_images_are_skipped_and_counted(shared_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated JPEG, an empty file and a text file named .jpeg in the training folder:
    skipped with a warning, counted in skipped.json, the audit record and the evaluation."""
    data = chest_subset(shared_data, tmp_path / "chest")
    good = sorted((shared_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[20]
    (data / "PNEUMONIA" / "person9998_bacteria_1.jpeg").write_bytes(
        good.read_bytes()[: good.stat().st_size // 3])
    (data / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"")
    (data / "NORMAL" / "IM-9998-0001.jpeg").write_text("not an image\n")
    run = tmp_path / "run"
    log = tmp_path / "audit.sqlite"
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(run),
                 "--epochs", "1", "--audit-log", str(log)]) == 0
    printed = capsys.readouterr().out
    assert "3 unreadable item(s) skipped" in printed
    skipped = json.loads((run / "skipped.json").read_text())
    assert skipped["count"] == 3
    assert {Path(i["path"]).name for i in skipped["items"]} == {
        "person9998_bacteria_1.jpeg", "IM-9999-0001.jpeg", "IM-9998-0001.jpeg"}
    assert all(i["reason"] for i in skipped["items"])
    from medvision.audit import AuditLog

    record = list(AuditLog(log).records())[-1]
    assert record["action"] == "train" and record["result"]["skipped_items"] == 3
    out = tmp_path / "eval"
    assert main(["evaluate", "chest-xray-pneumonia", "--data", str(data), "-o", str(out),
                 "--weights", str(run / "best.safetensors"), "--audit-log", str(log)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["skipped_items"]) == 3 and metrics["n"] == 16
    assert "3 unreadable item(s) skipped" in (out / "summary.html").read_text()


def test_a_folder_has_no_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "NORMAL").mkdir()
    assert main(["evaluate", "--pipeline", "chest-xray-pneumonia", "--data", str(tmp_path),
                 "--split", "test", "-o", str(tmp_path / "eval")]) == 2
    assert "no official test split" in capsys.readouterr().err


def test_evaluate_explain_scores_saliency_inside_the_truth(shared_data: Path,
                                                           tmp_path: Path) -> None:
    """The shipped hippocampus model's saliency lies mostly inside the true hippocampus: far
    above the share a map spread evenly would get (the region's share of the image)."""
    data = hippocampus_subset(shared_data, tmp_path / "hippo", slice(-4, None))
    out = tmp_path / "eval"
    assert main(["evaluate", "hippocampus-seg", "--data", str(data), "-o", str(out),
                 "--explain"]) == 0
    explanation = json.loads((out / "metrics.json").read_text())["explanation"]
    assert explanation["scored"] == 4
    inside, chance = explanation["energy_inside"], explanation["chance_level"]
    assert 0.0 <= chance["value"] < inside["value"] <= 1.0
    assert inside["ci95"][0] <= inside["value"] <= inside["ci95"][1]
    assert "explanation" in (out / "summary.html").read_text()


def test_deep_supervision_trains_and_predicts_one_output(shared_data: Path,
                                                         tmp_path: Path) -> None:
    """DynUNet with deep supervision (nnU-Net's): the coarser heads weigh 1/2, 1/4... in the
    training loss; validation, evaluation and inference see the full-resolution output only."""
    import yaml

    from medvision.models import build_model
    from medvision.train.loop import _init_from, _loss, supervised_loss

    data = hippocampus_subset(shared_data, tmp_path / "hippo", slice(0, 5))
    folder = tmp_path / "hippo-ds"
    folder.mkdir()
    repo = Path(__file__).resolve().parents[2]
    settings = yaml.safe_load((repo / "pipelines" / "hippocampus-seg" / "pipeline.yaml")
                              .read_text())
    settings.update(name="hippo-ds", members=[], model={"name": "dynunet", "params": {
        "kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2],
        "filters": [8, 16, 32, 64], "deep_supervision": True, "deep_supr_num": 2}})
    settings["qc"] = {}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    pipeline = load_pipeline(folder)

    model, loss_fn = build_model(pipeline), _loss(pipeline)
    image = torch.randn(2, 1, *pipeline.preprocess.size)
    label = torch.randint(0, 3, (2, 1, *pipeline.preprocess.size))
    out = model.train()(image)
    assert out.shape == (2, 3, 3, *pipeline.preprocess.size)  # batch, heads, classes, space
    expected = (4 * loss_fn(out[:, 0], label) + 2 * loss_fn(out[:, 1], label)
                + loss_fn(out[:, 2], label)) / 7
    assert float(supervised_loss(loss_fn, out, label).detach()) == pytest.approx(
        float(expected.detach()))
    with torch.no_grad():
        plain = model.eval()(image)
    assert plain.shape == (2, 3, *pipeline.preprocess.size)
    assert float(supervised_loss(loss_fn, plain, label)) == float(loss_fn(plain, label))

    run = tmp_path / "run"
    assert main(["train", str(folder), "--data", str(data), "-o", str(run), "--epochs", "1"]) == 0
    assert (run / "best.safetensors").is_file()
    out_dir = tmp_path / "eval"
    assert main(["evaluate", str(folder), "--data", str(data), "-o", str(out_dir),
                 "--weights", str(run / "best.safetensors")]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 5 and set(metrics["dice_per_class"]) == {"anterior", "posterior"}
    # --init-from the saved weights: every tensor, shared ones included, is loaded
    start = tmp_path / "init"
    start.mkdir()
    _init_from(build_model(pipeline), run / "best.safetensors", start)
    assert json.loads((start / "init.json").read_text())["fresh"] == []
