"""Research runs on record: a real MLflow server (SQLite backend) on loopback and TensorBoard
event files, read back as a user would; the epoch lines and curves; a tracker that is down,
or goes down mid-run, never stops training."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from medvision.cli.main import main
from medvision.config import config_hash, load_pipeline
from medvision.errors import ConfigError
from medvision.models import weights_sha256
from medvision.tracking import flatten, metric_values, parse_targets

from conftest import chest_subset, require, wait_until

REPO = Path(__file__).resolve().parents[2]
mlflow = pytest.importorskip("mlflow", reason="medvision[tracking] is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on loopback: SQLite backend, artifacts served by the server."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        import urllib.request

        binary = Path(sys.executable).with_name("mlflow")
        require(binary.is_file(), "the mlflow command is not installed")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(binary), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=log, start_new_session=True)

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError((self.folder / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_until(healthy, 120, "mlflow server did not start")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # uvicorn and its workers
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    running = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 real radiographs and a small, quick chest pipeline (64 px, 2 epochs, the last one
    averaged)."""
    root = tmp_path_factory.mktemp("chest")
    data = chest_subset(shared_data, root / "data", per_class=8)
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" /
                               "pipeline.yaml").read_text())
    settings.update(name="chest-tracked",
                    preprocess={**settings["preprocess"], "size": [64, 64]})
    settings["training"].update(epochs=2, swa_epochs=1, batch_size=8, folds=None,
                                early_stopping_patience=None)
    settings.pop("members", None)
    (root / "pipeline").mkdir()
    (root / "pipeline" / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return data, root / "pipeline"


def _history(client: object, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))  # type: ignore[attr-defined]


def test_targets_flattening_and_metric_names() -> None:
    uri = "http://127.0.0.1:5000"
    assert [t.location for t in parse_targets([uri])] == [uri]
    both = parse_targets(["tensorboard", f"{uri},tensorboard:/tmp/tb"])
    assert [(t.kind, t.location) for t in both] == [
        ("tensorboard", None), ("mlflow", uri), ("tensorboard", "/tmp/tb")]
    local = parse_targets(["mlflow"])[0]
    assert local.kind == "mlflow" and local.location and local.location.startswith("sqlite:///")
    with pytest.raises(ConfigError, match="give 'mlflow'"):
        parse_targets(["wandb"])
    assert flatten({"training": {"epochs": 3, "tracking": []}, "classes": ["a", "b"],
                    "x": None}) == {"training.epochs": "3", "training.tracking": "[]",
                                    "classes": '["a", "b"]', "x": "null"}
    assert metric_values({"n": 40, "auc": {"value": 0.9, "ci95": [0.8, 0.95]},
                          "per_class": {"A": {"recall": {"value": 0.5, "ci95": [0.1, 0.9]}}},
                          "roc": [[0, 1]], "note": "x"}, "eval_val") == {
        "eval_val.n": 40.0, "eval_val.auc": 0.9, "eval_val.auc.ci95_low": 0.8,
        "eval_val.auc.ci95_high": 0.95, "eval_val.per_class.A.recall": 0.5,
        "eval_val.per_class.A.recall.ci95_low": 0.1,
        "eval_val.per_class.A.recall.ci95_high": 0.9}
    # where a run is recorded is not what it trains
    pipeline = load_pipeline(REPO / "pipelines" / "chest-xray-pneumonia")
    tracked = pipeline.model_copy(update={"training": pipeline.training.model_copy(
        update={"tracking": ("mlflow",)})})
    assert config_hash(tracked) == config_hash(pipeline)


def test_a_missing_extra_says_which_to_install(chest: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "mlflow"
                        else real(name, *a))
    data, pipeline = chest
    for command in (["train", "--pipeline", str(pipeline), "--data", str(data), "-o",
                     str(tmp_path / "run")],
                    ["plan", str(data), "--budget-minutes", "1", "-o",
                     str(tmp_path / "plan.yaml")]):
        assert main([*command, "--tracking"]) == 2
        err = capsys.readouterr().err
        assert "pip install 'medvision[tracking]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "plan.yaml").exists()


@pytest.mark.integration
def test_a_run_its_evaluation_and_its_published_model_read_back_from_mlflow(
        server: MlflowServer, chest: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, pipeline = chest
    run = tmp_path / "run"
    assert main(["train", "--pipeline", str(pipeline), "--data", str(data), "-o", str(run),
                 "--device", "cpu", "--tracking", server.uri, "--tracking", "tensorboard"]) == 0
    out, err = capsys.readouterr()
    # a person at a terminal: one line per epoch, the tracked run named at the end
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], err
    assert "train loss" in lines[0] and "val loss" in lines[0] and "lr " in lines[0]
    assert "left" in lines[0] and "left" not in lines[1]
    assert "tracked: mlflow run url" in out
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((run / "tracking.json").read_text())
    run_id = saved["mlflow"]["run_id"]
    assert saved["mlflow"]["logged_epoch"] == 2 and saved["tensorboard"]["logged_epoch"] == 2
    client = MlflowClient(server.uri)
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.info.experiment_id == client.get_experiment_by_name(
        "chest-tracked").experiment_id
    params = tracked.data.params
    resolved = load_pipeline(run / "pipeline.yaml")
    assert params["training.epochs"] == "2" and params["preprocess.size"] == "[64, 64]"
    assert params["model.name"] == resolved.model.name
    assert params["device"] == "cpu" and params["precision"] == "float32"
    assert params["seed"] == str(resolved.training.seed)
    assert params["cli.output"] == str(run)
    tags = tracked.data.tags
    assert tags["medvision.pipeline"] == "chest-tracked"
    assert tags["medvision.pipeline_version"] == resolved.version
    assert tags["medvision.config_hash"] == config_hash(resolved)
    assert tags["medvision.weights_sha256"] == weights_sha256(run / "best.safetensors")
    assert len(tags["medvision.data_fingerprint"]) == 64
    assert tags["medvision.data.train_items"].isdigit()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for key in ("train_loss", "val_loss", "val_auc", "lr", "data_wait_share"):
        history = _history(client, run_id, key)
        assert [step for step, _ in history] == [1, 2], key
        assert [value for _, value in history] == pytest.approx(
            [float(r[key]) for r in rows]), key
    assert [s for s, _ in _history(client, run_id, "epoch_seconds")] == [1, 2]
    assert "swa_val_loss" in tracked.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"pipeline.yaml", "split.json", "curves.png", "metrics.csv"} <= artifacts

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert [e.value for e in events.Scalars("val_auc")] == pytest.approx(
        [float(r["val_auc"]) for r in rows])
    assert "curves" in events.Tags()["images"]

    # the evaluation's metrics, each with its interval, go to the run it evaluates
    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(run), "--weights", str(run / "best.safetensors"),
                 "--data", str(data), "--split", "val", "-o", str(evaluation),
                 "--device", "cpu", "--json", "--tracking", server.uri]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)  # stdout stays the JSON alone
    assert f"mlflow run id {run_id}" in err
    logged = client.get_run(run_id).data.metrics
    assert logged["eval_val.auc"] == pytest.approx(metrics["auc"]["value"])
    assert logged["eval_val.n"] == metrics["n"]
    intervals = {k: v["ci95"] for k, v in metrics.items() if isinstance(v, dict)
                 and all(isinstance(c, float) and c == c for c in v.get("ci95") or [None])}
    assert intervals  # the few validation cases still give some finite intervals
    for key, (low, high) in intervals.items():
        assert logged[f"eval_val.{key}.ci95_low"] == pytest.approx(low)
        assert logged[f"eval_val.{key}.ci95_high"] == pytest.approx(high)
    undefined = [k for k, v in metrics.items() if isinstance(v, dict) and k not in intervals
                 and "ci95" in v]
    assert all(f"eval_val.{k}.ci95_low" not in logged for k in undefined)  # NaN: not sent
    assert {a.path for a in client.list_artifacts(run_id, "eval_val")} == {
        "eval_val/summary.html", "eval_val/metrics.json"}
    assert json.loads((run / "tracking.json").read_text()) == saved  # not rewritten

    # publish registers a model version tagged with the shipped weights' digest
    shipped = tmp_path / "shipped"
    shutil.copytree(pipeline, shipped)
    assert main(["publish", str(run), "--pipeline", str(shipped), "--tracking",
                 server.uri]) == 0
    summary = json.loads(capsys.readouterr().out)
    digest = summary["weights_sha256"]
    registered = summary["registered"][server.uri]
    assert registered["run_id"] == run_id and registered["training_runs"] == [run_id]
    version = client.get_model_version("chest-tracked", registered["version"])
    assert version.tags["weights_sha256"] == digest and version.run_id == run_id
    files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(
        run_id, f"published/{digest[:16]}")}
    assert {"model.safetensors", "pipeline.yaml"} <= files

    # an auditor goes from a report's weights digest to the run, its data and parameters
    predictor_digest = load_digest(shipped)
    assert predictor_digest == digest
    assert main(["audit", "trace", digest, "--tracking", server.uri, "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    [found] = traced["versions"]
    [origin] = found["runs"]
    assert origin["run_id"] == run_id
    assert origin["tags"]["medvision.data_fingerprint"] == tags["medvision.data_fingerprint"]
    assert origin["params"]["training.epochs"] == "2"
    assert origin["url"].endswith(f"/runs/{run_id}")
    assert main(["audit", "trace", "0" * 64, "--tracking", server.uri]) == 1
    capsys.readouterr()

    # evaluating the shipped weights: a run of its own, linked to the run that made them
    assert main(["evaluate", "--pipeline", str(shipped), "--data", str(data), "--split", "val",
                 "-o", str(tmp_path / "eval-shipped"), "--device", "cpu", "--tracking",
                 server.uri]) == 0
    linked_id = next(line.rsplit(" ", 1)[1] for line in capsys.readouterr().err.splitlines()
                     if "mlflow run id" in line)
    linked = client.get_run(linked_id).data
    assert linked_id != run_id and linked.tags["medvision.evaluates_runs"] == run_id
    assert linked.tags["medvision.model_versions"] == f"chest-tracked/{registered['version']}"
    assert linked.tags["medvision.weights_sha256"] == digest
    assert "eval_val.auc" in linked.metrics

    # the audit report names the registered version and run of each weights digest
    assert main(["audit", "report", "--tracking", server.uri, "--format", "json", "-o", "-"]
                ) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tracked"][digest][0]["runs"][0]["run_id"] == run_id
    assert main(["audit", "report", "--tracking", server.uri, "-o",
                 str(tmp_path / "audit.html")]) == 0
    page = (tmp_path / "audit.html").read_text()
    assert "Weights on record in the tracker" in page and run_id in page


def load_digest(folder: Path) -> str:
    from medvision.infer import Predictor

    return str(Predictor.from_pipeline(str(folder), device="cpu").weights_sha256)


class Link:
    """A TCP path to the server that can be cut and restored, as a network outage does (the
    server keeps running; the client sees connections refused)."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):  # wakes the accepting thread (close alone does not)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self.sockets.clear()


@pytest.mark.integration
def test_a_tracker_that_goes_down_mid_run_never_stops_training(
        server: MlflowServer, chest: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    from medvision.train.progress import EpochReport

    data, pipeline = chest
    three = tmp_path / "pipeline"
    shutil.copytree(pipeline, three)
    settings = yaml.safe_load((three / "pipeline.yaml").read_text())
    settings.update(name="chest-outage")
    settings["training"].update(epochs=3)
    (three / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    link = Link(server.port)
    done = EpochReport.epoch_done

    def then_down(self: EpochReport, state: object) -> None:
        done(self, state)
        if getattr(state, "epoch", 0) == 1:
            link.cut()  # the tracker is gone after epoch 1 was sent

    monkeypatch.setattr(EpochReport, "epoch_done", then_down)
    run = tmp_path / "run"
    command = ["train", "--pipeline", str(three), "--data", str(data), "-o", str(run),
               "--device", "cpu", "--tracking", link.uri]
    try:
        assert main(command) == 0
        err = capsys.readouterr().err
        assert "tracking: mlflow" in err and "failed" in err and "the work goes on" in err
        assert err.count("tracking: mlflow") == 1, err  # warned once, not every epoch
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # the run's own files are whole
        assert (run / "best.safetensors").is_file() and (run / "calibration.json").is_file()
        saved = json.loads((run / "tracking.json").read_text())
        assert saved["mlflow"]["logged_epoch"] == 1

        # the tracker is back: --resume sends the epochs it missed, each once
        monkeypatch.setattr(EpochReport, "epoch_done", done)
        link.restore()
        assert main([*command, "--resume"]) == 0
        client = MlflowClient(server.uri)
        run_id = saved["mlflow"]["run_id"]
        assert [s for s, _ in _history(client, run_id, "train_loss")] == [1, 2, 3]
        assert [v for _, v in _history(client, run_id, "train_loss")] == pytest.approx(
            [float(r["train_loss"]) for r in rows])
        assert json.loads((run / "tracking.json").read_text())["mlflow"]["logged_epoch"] == 3
    finally:
        link.cut()


@pytest.mark.integration
def test_a_tracker_that_is_down_from_the_start_is_a_warning(
        chest: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, pipeline = chest
    run = tmp_path / "run"
    assert main(["train", "--pipeline", str(pipeline), "--data", str(data), "-o", str(run),
                 "--device", "cpu", "-q", "--tracking", f"http://127.0.0.1:{_free_port()}"]
                ) == 0
    err = capsys.readouterr().err
    assert "epoch 1/2" not in err and "Retrying" not in err  # -q: no epoch lines
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2
    assert (run / "curves.png").is_file()
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["logged_epoch"] == 0

    # the pipeline's training.tracking when the command names none
    own = tmp_path / "pipeline"
    shutil.copytree(pipeline, own)
    settings = yaml.safe_load((own / "pipeline.yaml").read_text())
    settings["training"].update(epochs=1, swa_epochs=0, tracking="tensorboard")
    (own / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    assert main(["train", "--pipeline", str(own), "--data", str(data), "-o",
                 str(tmp_path / "own"), "--device", "cpu", "-q"]) == 0
    assert list((tmp_path / "own" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_damaged_tracking_file_or_a_hostile_digest_is_said_not_obeyed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvision.tracking import TRACKING_FILE, Target, Tracker, registered_versions

    run = tmp_path / "run"
    run.mkdir()
    board = Target("tensorboard")
    for damaged in ("", "{truncated", "[1, 2]", '{"tensorboard": "x"}',
                    '{"tensorboard": {"logged_epoch": "nine"}}'):
        (run / TRACKING_FILE).write_text(damaged)
        tracker = Tracker.open([board], folder=run, experiment="x", run_name="r")
        tracker.sync_history([{"epoch": 1, "train_loss": 0.5}])
        tracker.finish()
        saved = json.loads((run / TRACKING_FILE).read_text())
        assert saved["tensorboard"]["logged_epoch"] == 1  # tracked afresh, epoch 1 sent
    # a digest is put into the registry's search filter: anything but 64 hex digits is refused
    for hostile in ("' OR name LIKE '%", "0" * 63, "../" + "a" * 61):
        with pytest.raises(ConfigError, match="is not a SHA-256 digest"):
            registered_versions("sqlite:///" + str(tmp_path / "m.db"), hostile)
    assert main(["audit", "trace", "x' OR '1'='1", "--tracking",
                 "sqlite:///" + str(tmp_path / "m.db")]) == 2
    assert "is not a SHA-256 digest" in capsys.readouterr().err


def test_a_full_disk_for_the_tracking_note_does_not_stop_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    import errno
    import logging

    import medvision.tracking as tracking

    def full(path: object, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    tracker = tracking.Tracker.open([tracking.Target("tensorboard")], folder=tmp_path,
                                    experiment="x", run_name="r")
    monkeypatch.setattr(tracking, "write_text_atomic", full)
    with caplog.at_level(logging.WARNING, logger="medvision.tracking"):
        tracker.sync_history([{"epoch": 1, "train_loss": 0.5}])  # does not raise
    assert "not written (" in caplog.text and "No space left" in caplog.text
    tracker.finish()
