"""A training run killed (SIGTERM, SIGKILL) at random points and resumed until it finishes
ends with the epochs of a run that was never interrupted: each once, with state.json and
metrics.csv agreeing after every kill."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 5


def _pipeline(folder: Path) -> Path:
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" /
                               "pipeline.yaml").read_text())
    settings.update(name="chest-kill", preprocess={**settings["preprocess"], "size": [96, 96]})
    settings["training"].update(epochs=EPOCHS, swa_epochs=2, batch_size=8, folds=None,
                                early_stopping_patience=None)
    settings.pop("members", None)
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder


def _train(pipeline: Path, data: Path, run: Path, resume: bool) -> subprocess.Popen[bytes]:
    # tracked in a local MLflow store when the extra is there: it too gets each epoch once
    tracking = (["--tracking", f"sqlite:///{run.parent / (run.name + '.db')}"]
                if importlib.util.find_spec("mlflow") else [])
    with (run.parent / f"{run.name}.log").open("ab") as log:  # a full pipe would stall it
        return subprocess.Popen(
            [sys.executable, "-m", "medvision", "train", "--pipeline", str(pipeline), "--data",
             str(data), "-o", str(run), "--device", "cpu", *(["--resume"] if resume else []),
             *tracking],
            stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "PYTHONHASHSEED": "0"})


def _tail(run: Path) -> str:
    return (run.parent / f"{run.name}.log").read_text(errors="replace")[-2000:]


def _epochs(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    return [int(row["epoch"]) for row in csv.DictReader(path.open())]


def _state_epoch(run: Path) -> int:
    path = run / "state.json"
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


@pytest.mark.slow  # two whole trainings and a dozen restarts: minutes
def test_kills_at_random_points_then_resume_give_each_epoch_once(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=16)
    pipeline = _pipeline(tmp_path / "pipeline")
    whole = tmp_path / "whole"
    done = _train(pipeline, data, whole, resume=False)
    started = time.monotonic()
    assert done.wait(timeout=900) == 0, _tail(whole)
    seconds = time.monotonic() - started
    assert _epochs(whole) == list(range(1, EPOCHS + 1))

    run = tmp_path / "killed"
    rng = random.Random(32)
    kills = {"SIGTERM": 0, "SIGKILL": 0}
    mid_run = 0  # kills that found a checkpoint and left epochs to do
    for attempt in range(40):
        process = _train(pipeline, data, run, resume=attempt > 0)
        try:
            process.wait(timeout=rng.uniform(0.25, 0.9) * seconds)
        except subprocess.TimeoutExpired:
            how = signal.SIGTERM if attempt % 2 == 0 else signal.SIGKILL
            process.send_signal(how)
            process.wait(timeout=120)
            kills[how.name] += 1
            state, rows = _state_epoch(run), _epochs(run)
            # after every kill the two files agree (SIGTERM waits for a whole checkpoint;
            # after SIGKILL, at most the second phase is left for --resume to finish)
            assert rows == list(range(1, len(rows) + 1))
            if how == signal.SIGTERM:
                assert len(rows) == state
            else:
                assert state - 1 <= len(rows) <= state
            mid_run += 0 < state < EPOCHS
            continue
        assert process.returncode == 0, _tail(run)
        break
    else:
        raise AssertionError("the run never finished")
    assert kills["SIGTERM"] >= 1 and kills["SIGKILL"] >= 1, kills
    assert mid_run >= 1, "no kill landed between the first and the last epoch"
    assert _epochs(run) == _epochs(whole) == list(range(1, EPOCHS + 1))
    assert _state_epoch(run) == EPOCHS
    assert not list(run.glob("*.next")) and not list(run.glob("*.tmp"))
    if importlib.util.find_spec("mlflow"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'killed.db'}")
        run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id,
                                                                              "train_loss"))
        assert [step for step, _ in history] == list(range(1, EPOCHS + 1))  # once each
        assert [v for _, v in history] == pytest.approx([float(r["train_loss"]) for r in rows])
        assert [r.info.run_id for r in client.search_runs(
            [client.get_experiment_by_name("chest-kill").experiment_id])] == [run_id]
