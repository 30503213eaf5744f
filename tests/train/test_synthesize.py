"""A tiny class-conditional diffusion model trains on real radiographs, resumes, and samples
labelled images that say they are synthetic."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medvision.cli.main import main
from medvision.errors import ConfigError

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]


def _pipeline(tmp_path: Path) -> Path:
    folder = tmp_path / "chest-gen"
    folder.mkdir()
    settings = yaml.safe_load((REPO / "pipelines" / "chest-xray-pneumonia" / "pipeline.yaml")
                              .read_text())
    settings["name"] = "chest-gen"
    settings["generative"] = {"size": [16, 16], "channels": [8, 16],
                              "attention_levels": [False, False], "timesteps": 50,
                              "sample_steps": 3, "batch_size": 4, "epochs": 2}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    return folder


def test_generator_trains_resumes_and_samples_labelled_synthetic_images(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _pipeline(tmp_path)
    data = chest_subset(shared_data, tmp_path / "data", per_class=6)
    run = tmp_path / "gen"
    tracking = ["--tracking", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert main(["synthesize", "train", str(folder), "--data", str(data), "-o", str(run),
                 "--max-steps", "2", *tracking]) == 0
    assert "1 epoch(s), 2 step(s)" in capsys.readouterr().out
    assert main(["synthesize", "train", str(folder), "--data", str(data), "-o", str(run),
                 "--resume", *tracking]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    if tracking:  # both sessions' epochs in TensorBoard, each once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [
            (int(r["epoch"]), round(float(r["loss"]), 5)) for r in rows]
    per_class = json.loads((run / "data.json").read_text())["per_class"]
    assert set(per_class) == {"NORMAL", "PNEUMONIA"}  # training side of the split only
    assert sum(per_class.values()) < 12
    out = tmp_path / "synthetic"
    assert main(["synthesize", "sample", str(folder), "--generator", str(run), "-o", str(out),
                 "--per-class", "3", "--seed", "7"]) == 0
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((out / name).glob("*.png"))
        assert len(files) == 3
        for path in files:
            image = Image.open(path)
            assert image.size == (16, 16) and image.mode == "L"
            flag = json.loads(image.text["medvision-synthetic"])
            assert flag["synthetic"] is True and flag["class"] == name and flag["seed"] == 7
            assert json.loads(path.with_name(path.name + ".json").read_text()) == flag
    assert json.loads((out / "provenance.json").read_text())["files"] == 6
    # the same seed gives the same images
    again = tmp_path / "again"
    assert main(["synthesize", "sample", str(folder), "--generator", str(run), "-o", str(again),
                 "--per-class", "3", "--seed", "7", "--classes", "NORMAL"]) == 0
    first = sorted((out / "NORMAL").glob("*.png"))[0]
    assert (again / "NORMAL" / first.name).read_bytes() == first.read_bytes()
    # scoring a model on them says they are synthetic, in metrics.json, page and audit record
    log = tmp_path / "audit.sqlite"
    assert main(["evaluate", "chest-xray-pneumonia", "--data", str(out), "-o",
                 str(tmp_path / "ev"), "--audit-log", str(log)]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["synthetic_items"] == 6
    assert "6 of the 6 cases are synthetic images" in (tmp_path / "ev" / "summary.html").read_text()
    from medvision.audit.log import AuditLog

    record = next(r for r in AuditLog(log).records() if r["action"] == "evaluate")
    assert record["inputs"]["synthetic_items"] == 6


def test_only_classification_pipelines_synthesize(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classification pipelines"):
        main(["--debug", "synthesize", "train", "hippocampus-seg", "--data",
              str(shared_data / "hippocampus"), "-o", str(tmp_path / "g"), "--max-steps", "1"])


def test_the_synthetic_flag_reaches_the_report_and_the_audit_record(tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    from medvision.audit.log import AuditLog

    provenance = {"synthetic": True, "generator_sha256": "ab" * 32, "seed": 1, "class": "NORMAL"}
    text = PngImagePlugin.PngInfo()
    text.add_text("medvision-synthetic", json.dumps(provenance))
    image = tmp_path / "in" / "synthetic-NORMAL-1-00000.png"
    image.parent.mkdir()
    Image.new("L", (64, 64), 90).save(image, pnginfo=text)
    plain = tmp_path / "in" / "plain.png"
    Image.new("L", (64, 64), 90).save(plain)
    out, log = tmp_path / "out", tmp_path / "audit.sqlite"
    main(["analyze", str(image.parent), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
          "--audit-log", str(log)])
    reports = {json.loads(p.read_text())["input"]["source_name"]: json.loads(p.read_text())
               for p in out.rglob("report.json")}
    assert reports[image.name]["input"]["synthetic"] == provenance
    assert "synthetic" not in reports[plain.name]["input"]
    records = [r for r in AuditLog(log).records() if r["action"] == "analyze"]
    flagged = [r for r in records if r["inputs"].get("synthetic")]
    assert len(records) == 2 and len(flagged) == 1
    assert flagged[0]["inputs"]["synthetic"]["generator_sha256"] == "ab" * 32
