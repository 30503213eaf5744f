"""`make model-*` (tools/reproduce.sh) on a cross-validation pipeline: every fold trained,
the ensemble shipped, and a second run trains nothing again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]


def test_reproduce_trains_each_fold_once_and_ships_the_ensemble(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "chest-folds"
    folder.mkdir()
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                              .read_text())
    settings["name"] = "chest-folds"
    settings["preprocess"]["size"] = [32, 32]
    settings["training"].update(epochs=1, batch_size=4, folds=2, swa_epochs=0)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    data = chest_subset(shared_data, tmp_path / "data", per_class=6)
    command = ["bash", str(REPO / "tools" / "reproduce.sh"), str(folder), str(data),
               str(tmp_path / "runs")]
    env = {"BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    ensemble = json.loads((folder / "ensemble.json").read_text())
    assert len(ensemble["members"]) == 2
    for i in (0, 1):
        assert (tmp_path / "runs" / "chest-folds" / f"fold{i}" / "calibration.json").is_file()
    oof = json.loads((tmp_path / "runs" / "chest-folds-eval-oof" / "metrics.json").read_text())
    assert set(oof["per_fold"]) >= {"fold 0", "fold 1"}
    assert oof["n"] == sum(oof["per_fold"][f"fold {i}"]["n"] for i in (0, 1))
    stamp = (tmp_path / "runs" / "chest-folds" / "fold0" / "last.safetensors").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained already") == 2
    assert (tmp_path / "runs" / "chest-folds" / "fold0" / "last.safetensors").stat(
    ).st_mtime_ns == stamp
