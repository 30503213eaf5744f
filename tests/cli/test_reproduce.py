"""`make model-*` (tools/reproduce.sh) on a cross-validation pipeline: every fold trained,
the ensemble shipped, and a second run trains nothing again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import chest_subset, hippocampus_subset

REPO = Path(__file__).resolve().parents[2]


def _shipped_settings(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "pipelines" / name / "pipeline.yaml").read_text())


def _reproduce(folder: Path, data: Path, runs: Path, devices: str = ""
               ) -> subprocess.CompletedProcess[str]:
    """`tools/reproduce.sh` as the make targets call it (checked to succeed); ``devices``:
    train folds or members in parallel, one per device (DEVICES)."""
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "reproduce.sh"), str(folder), str(data), str(runs)],
        capture_output=True, text=True, timeout=900,
        env={"BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin",
             "DEVICES": devices})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_reproduce_trains_each_fold_once_and_ships_the_ensemble(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "chest-folds"
    folder.mkdir()
    settings = _shipped_settings("chest-xray-pneumonia")
    settings["name"] = "chest-folds"
    settings["preprocess"]["size"] = [32, 32]
    settings["training"].update(epochs=1, batch_size=4, folds=2, swa_epochs=0)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    data = chest_subset(shared_data, tmp_path / "data", per_class=6)
    # the folds in parallel, one per "device" (two CPU slots here, two GPUs on a server)
    first = _reproduce(folder, data, tmp_path / "runs", devices="cpu,cpu")
    assert first.stdout.count("training on cpu") == 2
    ensemble = json.loads((folder / "ensemble.json").read_text())
    assert len(ensemble["members"]) == 2
    for i in (0, 1):
        assert (tmp_path / "runs" / "chest-folds" / f"fold{i}" / "calibration.json").is_file()
        assert "on cpu" in (tmp_path / "runs" / "chest-folds" / f"fold{i}.log").read_text()
    oof = json.loads((tmp_path / "runs" / "chest-folds-eval-oof" / "metrics.json").read_text())
    assert set(oof["per_fold"]) >= {"fold 0", "fold 1"}
    assert oof["n"] == sum(oof["per_fold"][f"fold {i}"]["n"] for i in (0, 1))
    stamp = (tmp_path / "runs" / "chest-folds" / "fold0" / "last.safetensors").stat().st_mtime_ns
    again = _reproduce(folder, data, tmp_path / "runs")
    assert again.stdout.count("trained already") == 2
    assert (tmp_path / "runs" / "chest-folds" / "fold0" / "last.safetensors").stat(
    ).st_mtime_ns == stamp


@pytest.mark.slow  # the fold test runs the same script path in the default run
def test_reproduce_trains_each_member_once_and_ships_the_ensemble(shared_data: Path,
                                                                  tmp_path: Path) -> None:
    from medvision.models import ModelBundle

    folder = tmp_path / "hippo-members"
    folder.mkdir()
    settings = _shipped_settings("hippocampus-seg")
    settings.update(name="hippo-members", model={"name": "unet", "params": {
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}, qc={})
    settings["members"] = [{"model": {"name": "segresnet", "params": {"init_filters": 8}},
                            "training": {"epochs": 2}}]
    settings["training"].update(epochs=1, early_stopping_patience=None)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    data = hippocampus_subset(shared_data, tmp_path / "data", slice(0, 8))
    runs = tmp_path / "runs" / "hippo-members"
    _reproduce(folder, data, tmp_path / "runs")
    bundle = ModelBundle.load(folder)
    assert [m.member for m in bundle.members] == [0, 1]
    assert bundle.members[1].model is not None and bundle.members[1].model.name == "segresnet"
    for i, epochs in ((0, 1), (1, 2)):
        state = json.loads((runs / f"member{i}" / "state.json").read_text())
        assert state["finished"] and state["epoch"] == epochs
    val = json.loads((tmp_path / "runs" / "hippo-members-eval-val" / "metrics.json").read_text())
    assert val["n"] == 2 and set(val["dice_per_class"]) == {"anterior", "posterior"}
    stamp = (runs / "member1" / "best.safetensors").stat().st_mtime_ns
    again = _reproduce(folder, data, tmp_path / "runs")
    assert again.stdout.count("trained already") == 2
    assert (runs / "member1" / "best.safetensors").stat().st_mtime_ns == stamp

    # an early-stopped run resumed trains no further, even with epochs left
    state = json.loads((runs / "member1" / "state.json").read_text())
    state.update(epoch=1, early_stopped=True)
    (runs / "member1" / "state.json").write_text(json.dumps(state))
    rows = (runs / "member1" / "metrics.csv").read_text().count("\n")
    resumed = subprocess.run(
        [str(Path(sys.executable).parent / "medvision"), "-v", "train", str(folder), "--data",
         str(data), "-o", str(runs / "member1"), "--member", "1", "--resume"],
        capture_output=True, text=True, timeout=900,
        env={"BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped early after epoch 1" in resumed.stderr
    assert (runs / "member1" / "metrics.csv").read_text().count("\n") == rows
