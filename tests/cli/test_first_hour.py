"""A newcomer's first hour: no silent success, no aborted batch, exit codes as documented,
broken pipes, and reports that say true things (calibration, pictures without a size,
findings as sentences)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medvision.cli.main import main

from conftest import chest_subset

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"


def test_an_empty_folder_is_a_usage_error_that_says_what_was_searched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "scans"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["analyze", str(empty), "--pipeline", "chest-xray-pneumonia", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no study found in {empty}: no file" in err and "Traceback" not in err
    assert not out.exists()  # nothing written for nothing found
    (empty / "notes.txt").write_text("reading list\n")
    assert main(["analyze", str(empty), "--pipeline", "chest-xray-pneumonia", "-o",
                 str(out)]) == 2
    assert "1 file(s), none an image or DICOM file" in capsys.readouterr().err


def test_a_missing_input_and_a_stray_text_file_do_not_stop_the_batch(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=1)
    folder = tmp_path / "scans"
    folder.mkdir()
    image = next((data / "NORMAL").iterdir())
    shutil.copy(image, folder / image.name)
    (folder / "notes.txt").write_text("to read: Kermany 2018\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # looks like one
    missing = tmp_path / "typo"
    out = tmp_path / "out"
    code = main(["analyze", str(folder), str(missing), "--pipeline", "chest-xray-pneumonia",
                 "-o", str(out), "--json", "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 1  # a rejected input counts
    studies = {s["study"]: s for s in json.loads(captured.out)["studies"]}
    assert set(studies) == {image.name.split(".")[0], "broken", "typo"}
    assert studies["typo"]["status"] == "rejected"
    assert "no such file or folder" in studies["typo"]["reason"]
    assert studies["broken"]["status"] in ("rejected", "failed")
    assert studies[image.name.split(".")[0]]["status"] in ("ok", "flagged")
    # the text file is skipped, said once, and named in the batch summary
    assert captured.err.count("skipped: not images (notes.txt)") == 1
    summary = (out / "summary.html").read_text()
    assert "1 file(s) skipped, not images: notes.txt" in summary
    # a picture has no physical size: said once for the batch, not as a flag per image
    report = json.loads((out / image.name.split(".")[0] / "report.json").read_text())
    assert report["input"]["geometry"]["spacing_known"] is False
    assert not [f for f in report["qc"]["flags"] if f["code"] == "geometry_note"]
    assert "pictures (PNG, JPEG...) without a physical size" in summary
    page = (out / image.name.split(".")[0] / "report.html").read_text()
    assert "pixels (a picture: no physical size)" in page and "voxels of 1.0" not in page


def test_the_chest_ensembles_report_says_how_it_is_calibrated(
        shared_data: Path, tmp_path: Path) -> None:
    data = chest_subset(shared_data, tmp_path / "data", per_class=1)
    out = tmp_path / "out"
    assert main(["analyze", str(data / "PNEUMONIA"), "--pipeline", "chest-xray-pneumonia",
                 "-o", str(out), "--workers", "0"]) in (0, 1)
    [report_file] = out.glob("*/report.json")
    report = json.loads(report_file.read_text())
    members = json.loads((REPO / "pipelines" / "chest-xray-pneumonia" /
                          "ensemble.json").read_text())["members"]
    temperatures = sorted(float(m["temperature"]) for m in members)
    assert temperatures[0] != 1.0  # the members are calibrated, as the model card says
    assert report["prediction"]["calibrated"] is True
    assert report["pipeline"]["calibration"] == (
        f"each member calibrated (temperatures {temperatures[0]:.2f}-{temperatures[-1]:.2f}),"
        " probabilities averaged")
    page = (report_file.parent / "report.html").read_text()
    assert "uncalibrated" not in page and report["pipeline"]["calibration"] in page
    label = report["prediction"]["label"]
    assert report["prediction"]["finding"] == (
        f"{label} (probability {report['prediction']['probabilities'][label]:.2f}).")
    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", "chest-xray-pneumonia", "--data", str(data),
                 "-o", str(evaluation)]) == 0
    assert report["pipeline"]["calibration"] in (evaluation / "summary.html").read_text()
    assert "calibration temperature 1.000" not in (evaluation / "summary.html").read_text()


def test_a_segmentation_finding_is_a_sentence_with_volumes(tmp_path: Path) -> None:
    from medvision.report.json import finding_sentence

    names = {"anterior": "anterior hippocampus", "posterior": "posterior hippocampus"}
    assert finding_sentence({"label": "anterior+posterior", "volumes_ml": {
        "anterior": 2.314, "posterior": 1.851}}, names) == (
        "Segmented anterior hippocampus (2.31 mL) and posterior hippocampus (1.85 mL), "
        "4.17 mL in all.")
    assert finding_sentence({"label": "none", "volumes_ml": {"anterior": 0.0, "posterior": 0}},
                            names) == ("Nothing segmented: no anterior hippocampus or "
                                       "posterior hippocampus found.")
    assert finding_sentence({"label": "RBC+WBC", "counts": {"RBC": 12, "WBC": 1,
                                                             "Platelets": 0}}, {}) == (
        "Detected 12 RBC, 1 WBC and no Platelets.")
    out = tmp_path / "out"
    main(["analyze", str(SAMPLE / "mr_phantom.nii.gz"), "--pipeline", "hippocampus-seg", "-o",
          str(out), "--workers", "0"])
    report = json.loads(next(out.glob("*/report.json")).read_text())
    if report["prediction"] is not None:  # a phantom may be withheld as out of distribution
        assert report["pipeline"]["class_names"]["anterior"] == "anterior hippocampus"
        assert "hippocampus" in report["prediction"]["finding"]
        assert "+" not in report["prediction"]["finding"]


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    for command in (["pipelines", "list"], ["pipelines", "schema"],
                    ["info", str(SAMPLE / "mr_phantom.nii.gz")]):
        process = subprocess.Popen([sys.executable, "-m", "medvision", *command],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader goes away before the first line (head -0)
        err = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141, err
        assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("command", [
    ["info", "MISSING"],
    ["train", "--pipeline", "chest-xray-pneumonia", "--data", "MISSING", "-o", "OUT"],
    ["train", "--pipeline", "chest-xray-pneumonia", "--data", "WRONG", "-o", "OUT"],
    ["evaluate", "--pipeline", "hippocampus-seg", "--data", "WRONG", "-o", "OUT"],
    ["plan", "MISSING", "--budget-minutes", "1", "-o", "OUT/plan.yaml"],
])
def test_a_missing_path_or_a_wrong_layout_is_a_usage_error(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong"
    (wrong / "cats").mkdir(parents=True)  # neither the chest classes nor images/ + labels/
    args = [str(tmp_path / "missing") if a == "MISSING" else str(wrong) if a == "WRONG"
            else a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medvision: error: ") and "Traceback" not in err


def test_the_default_audit_log_is_named_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MEDVISION_AUDIT_LOG")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    expected = tmp_path / "data-home" / "medvision" / "audit.sqlite"
    for attempt in range(2):
        assert main(["analyze", str(SAMPLE / "mr_phantom.nii.gz"), "--pipeline",
                     "hippocampus-seg", "-o", str(tmp_path / "out"), "--workers", "0"]) in (0, 1)
        err = capsys.readouterr().err
        assert (f"audit records go to {expected}" in err) == (attempt == 0)
    assert expected.is_file()


def test_pipeline_summaries_end_on_whole_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pipelines", "list"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()
             if line.startswith("    ")]
    assert lines
    joined = " ".join(lines)
    assert joined.endswith((".", "...")), joined
    for name in ("chest-xray-pneumonia", "hippocampus-seg", "adrenal-3d", "bccd-cells"):
        assert main(["pipelines", "list"]) == 0 and name in capsys.readouterr().out


def test_the_documentation_comes_with_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs"]) == 0
    listing = capsys.readouterr().out
    assert "training" in listing and "Training, evaluating and shipping a pipeline" in listing
    assert main(["docs", "training", "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and path.name == "training.md"
    assert main(["docs", "nonsense"]) == 2
