"""Honest statuses (flagged, withheld) and safe resume (skip only what matches this run)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from medvision.cli.main import main
from medvision.io import read_volume
from medvision.report import SCHEMA_VERSION, load_schema

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mr_slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Brain MR and head CT slices as 8-bit PNGs: not chest radiographs, but acceptable
    files (modality OT), so only the out-of-distribution guard can tell."""
    from conftest import SHARED_DATA, require

    require(SHARED_DATA.is_dir(), f"real data folder {SHARED_DATA} not found")
    folder = tmp_path_factory.mktemp("mr")
    sources = sorted((SHARED_DATA / "dicom" / "transfer_syntaxes" / "In").iterdir())[:1]
    sources += sorted((SHARED_DATA / "dicom" / "ct_head_tilt").glob("*.dcm"))[5:25:5]
    for index, source in enumerate(sources):
        array = np.asarray(read_volume(source).array[0])
        array = array[..., array.shape[-1] // 2] if array.ndim == 3 else array
        low, high = np.percentile(array, [1, 99])
        scaled = np.clip((array - low) / (high - low + 1e-6) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(scaled.T).save(folder / f"head{index}.png")
    return folder


def _reports(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}


def test_out_of_distribution_inputs_are_flagged_not_ok(mr_slices: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(mr_slices), "--pipeline", "chest-xray-pneumonia", "-o", str(out)]
    assert main(args) == 0  # flagged is not a failure by default...
    printed = capsys.readouterr().out
    reports = _reports(out)
    assert len(reports) == 5
    assert "5 studies: 0 ok, 5 flagged" in printed
    for key, report in reports.items():
        jsonschema.validate(report, load_schema())
        assert report["schema_version"] == SCHEMA_VERSION
        assert report["status"] == "flagged"
        assert report["qc"]["flagged_by"][0] == "out_of_distribution"
        assert report["qc"]["ood_distance"] > report["qc"]["ood_threshold"]
        assert "out of distribution" in report["reason"]
        page = (out / key / "report.html").read_text()
        banner = page.index('class="flag-banner"')
        assert banner < page.index("<table>")  # next to the finding, above it
        assert "may not apply" in page[banner:banner + 300]
    rows = (out / "summary.csv").read_text().splitlines()[1:]
    assert len(rows) == 5 and all(",flagged," in row for row in rows)
    assert "5 flagged" in (out / "summary.html").read_text()
    # ...and is one with --fail-on flagged (everything is skipped, nothing re-analysed)
    assert main([*args, "--fail-on", "flagged"]) == 1
    assert "5 unchanged, skipped" in capsys.readouterr().out


def _pipeline_copy(tmp_path: Path, **qc: object) -> Path:
    source = REPO / "pipelines" / "chest-xray-pneumonia"
    folder = tmp_path / "chest-abstain"
    shutil.copytree(source, folder)
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    config["qc"].update(qc)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_abstaining_pipeline_withholds_label_probabilities_and_saliency(
        mr_slices: Path, tmp_path: Path, shared_data: Path) -> None:
    pipeline = _pipeline_copy(tmp_path, on_out_of_distribution="abstain")
    normal = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    inputs = [str(mr_slices / "head0.png"), str(normal)]
    out = tmp_path / "out"
    assert main(["analyze", *inputs, "--pipeline", str(pipeline), "-o", str(out)]) == 0
    head = json.loads((out / "head0" / "report.json").read_text())
    jsonschema.validate(head, load_schema())
    assert head["status"] == "flagged" and head["qc"]["withheld"] is True
    assert head["prediction"] is None and head["saliency"] is None
    assert "withheld" in head["reason"]
    assert sorted(p.name for p in (out / "head0").iterdir()) == ["report.html", "report.json"]
    page = (out / "head0" / "report.html").read_text()
    assert "Result withheld" in page
    assert not re.search(r"NORMAL|PNEUMONIA", page.split("About the model")[0])
    chest = json.loads((out / normal.stem / "report.json").read_text())
    assert chest["status"] == "ok" and chest["prediction"]["label"] in ("NORMAL", "PNEUMONIA")
    assert "(withheld)" in (out / "summary.csv").read_text()


def test_resume_reruns_what_changed_and_skips_what_did_not(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = sorted((shared_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    out = tmp_path / "out"
    report = out / source.stem / "report.json"
    base = ["analyze", str(source), "-o", str(out)]
    assert main([*base, "--pipeline", "chest-xray-pneumonia"]) == 0
    first = json.loads(report.read_text())
    assert first["run"]["explain_method"] == "gradcam" and "replaces" not in first

    # same pipeline, method and backend: skipped, the report untouched
    assert main([*base, "--pipeline", "chest-xray-pneumonia"]) == 0
    assert "1 unchanged, skipped" in capsys.readouterr().out
    assert json.loads(report.read_text()) == first

    # another explanation method: re-run, and the report says what it replaced
    assert main([*base, "--pipeline", "chest-xray-pneumonia", "--explain", "saliency"]) == 0
    assert "1 re-analysed" in capsys.readouterr().out
    second = json.loads(report.read_text())
    jsonschema.validate(second, load_schema())
    assert second["saliency"]["method"] == "saliency"
    assert second["replaces"]["changed"] == ["explain_method"]
    assert second["replaces"]["created"] == first["created"]

    # --no-overwrite with yet another option: a conflict, the existing report kept
    assert main([*base, "--pipeline", "chest-xray-pneumonia", "--no-overwrite"]) == 1
    printed = capsys.readouterr().out
    assert "1 conflict" in printed and "explain_method" in printed
    assert json.loads(report.read_text()) == second

    # another pipeline into the same folder: re-run (and rejected: 2D input, 3D model)
    assert main([*base, "--pipeline", "hippocampus-seg"]) == 1
    third = json.loads(report.read_text())
    assert third["status"] == "rejected" and third["pipeline"]["name"] == "hippocampus-seg"
    assert {"pipeline", "weights_sha256", "config_hash"} <= set(third["replaces"]["changed"])
    assert not (out / source.stem / "saliency.nii.gz").exists()  # no stale output left


def test_resume_reruns_when_the_input_file_changed(shared_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    target = folder / "scan.jpeg"
    shutil.copy(images[0], target)
    out = tmp_path / "out"
    args = ["analyze", str(target), "--pipeline", "chest-xray-pneumonia", "-o", str(out)]
    assert main(args) == 0
    shutil.copy(images[1], target)  # same name, other image
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 re-analysed" in printed
    report = json.loads((out / "scan" / "report.json").read_text())
    assert report["replaces"]["changed"] == ["input_sha256"]


def test_backend_is_part_of_the_run(shared_data: Path, tmp_path: Path) -> None:
    """The run fingerprint names the backend, so an ONNX run never reuses a PyTorch report."""
    from medvision.analyze.runner import AnalyzeOptions, run_fingerprint
    from medvision.analyze.studies import collect_studies
    from medvision.infer import Predictor

    source = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    study = collect_studies([source])[0]
    predictor = Predictor.from_pipeline("chest-xray-pneumonia")
    run = run_fingerprint(predictor, AnalyzeOptions(), study)
    assert run["backend"] == "torch"
    assert run_fingerprint(predictor, AnalyzeOptions(faithfulness=True), study) != run


def test_a_damaged_earlier_report_is_analysed_again(shared_data: Path, tmp_path: Path) -> None:
    source = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    out = tmp_path / "out"
    args = ["analyze", str(source), "--pipeline", "chest-xray-pneumonia", "-o", str(out)]
    assert main(args) == 0
    report = out / source.stem / "report.json"
    report.write_text(report.read_text()[:100])  # cut short, say by a full disk
    assert main(args) == 0
    jsonschema.validate(json.loads(report.read_text()), load_schema())
