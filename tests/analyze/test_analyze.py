"""``medvision analyze`` end to end with the shipped pipelines on real files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medvision.cli.main import main
from medvision.io import read_volume
from medvision.report import load_schema

from conftest import pydicom_test_files

REPO = Path(__file__).resolve().parents[2]
RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")


def _reports(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}


def _check_html(folder: Path) -> None:
    page = (folder / "report.html").read_text()
    assert "Not for diagnostic use" in page
    for name in re.findall(r'<img src="([^"]+)"', page):
        assert (folder / name).is_file(), name


def _same_grid(saliency_path: Path, volume) -> None:
    saliency = read_volume(saliency_path)
    assert saliency.spatial_shape[: volume.spatial_dims] == volume.spatial_shape
    assert saliency.spatial_shape[volume.spatial_dims:] in ((), (1,))
    np.testing.assert_allclose(saliency.affine, volume.affine, atol=1e-5)


@pytest.fixture
def chest_batch(shared_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for cls in ("NORMAL", "PNEUMONIA"):
        source = sorted((shared_data / "chest_xray" / "train" / cls).glob("*.jpeg"))[0]
        shutil.copy(source, folder / source.name)
    shutil.copy(RG1, folder / "RG1_UNCR.dcm")
    other = pydicom.dcmread(RG1)  # another study, whose file was cut short in transfer
    other.StudyInstanceUID, other.SOPInstanceUID = generate_uid(), generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.save_as(folder / "whole.dcm")
    data = (folder / "whole.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (folder / "whole.dcm").unlink()
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_chest_batch_with_bad_files(chest_batch: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["analyze", str(chest_batch), "--pipeline", "chest-xray-pneumonia", "-o", str(out)])
    assert code == 1  # the truncated study rejected, the others done
    reports = _reports(out)
    statuses = sorted(r["status"] for r in reports.values())
    # the adult CR radiograph is out of distribution for a paediatric model: flagged; the
    # text file is not an image: skipped (said once), not a rejected study
    assert statuses == ["flagged", "ok", "ok", "rejected"]
    rejected = {r["input"]["source_name"]: r["reason"] for r in reports.values()
                if r["status"] == "rejected"}
    assert any("truncated" in reason for reason in rejected.values())
    assert "notes.txt" not in rejected
    assert "1 file(s) skipped, not images: notes.txt" in (out / "summary.html").read_text()
    schema = load_schema()
    for key, report in reports.items():
        jsonschema.validate(report, schema)
        _check_html(out / key)
    for report in reports.values():
        if report["status"] not in ("ok", "flagged"):
            continue
        probabilities = report["prediction"]["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert report["prediction"]["label"] in probabilities
        assert report["saliency"]["method"] == "gradcam"
        assert report["pipeline"]["weights_sha256"] and report["pipeline"]["config_hash"]
    # saliency on exactly the input's grid, for the JPEGs and the DICOM radiograph
    jpeg = next(chest_batch.glob("IM-*.jpeg"))
    _same_grid(out / jpeg.stem.split(".")[0] / "saliency.nii.gz", read_volume(jpeg))
    dicom_key = next(k for k, r in reports.items() if r["input"]["format"] == "dicom"
                     and r["status"] == "flagged")
    _same_grid(out / dicom_key / "saliency.nii.gz", read_volume(chest_batch / "RG1_UNCR.dcm"))
    # an adult CR radiograph is not a paediatric Kermany image: the feature guard says so
    assert reports[dicom_key]["qc"]["out_of_distribution"] is True
    assert reports[dicom_key]["qc"]["flagged_by"] == ["out_of_distribution"]
    assert reports[jpeg.stem.split(".")[0]]["qc"]["out_of_distribution"] is False
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 4 and (out / "summary.html").is_file()
    assert sorted(r["status"] for r in rows) == statuses
    assert "2 ok, 1 flagged, 1 rejected" in capsys.readouterr().out


def test_done_studies_are_skipped_unless_forced(shared_data: Path, tmp_path: Path, capsys) -> None:
    source = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    out = tmp_path / "out"
    args = ["analyze", str(source), "--pipeline", "chest-xray-pneumonia", "-o", str(out)]
    assert main(args) == 0
    report = out / source.stem / "report.json"
    first = json.loads(report.read_text())["created"]
    report.write_text(report.read_text().replace(first, "2000-01-01T00:00:00+00:00"))
    assert main(args) == 0
    assert "1 unchanged, skipped" in capsys.readouterr().out
    assert "2000-01-01" in report.read_text()
    assert main([*args, "--force"]) == 0
    forced = json.loads(report.read_text())
    assert not forced["created"].startswith("2000-01-01")
    version = json.loads(report.read_text())["pipeline"]["version"]
    assert forced["replaces"] == {"created": "2000-01-01T00:00:00+00:00", "status": "ok",
                                  "pipeline": f"chest-xray-pneumonia {version}", "changed": []}


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency",
                                    pytest.param("occlusion", marks=pytest.mark.slow)])
def test_other_saliency_methods(shared_data: Path, tmp_path: Path, method: str) -> None:
    source = sorted((shared_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    out = tmp_path / "out"
    assert main(["analyze", str(source), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--explain", method, "--faithfulness"]) == 0
    report = json.loads((out / source.stem / "report.json").read_text())
    assert report["saliency"]["method"] == method
    faith = report["saliency"]["faithfulness"]
    assert 0 <= faith["deletion_auc"] and len(faith["scores"]) == 11
    saliency = read_volume(out / source.stem / "saliency.nii.gz")
    assert 0.0 <= saliency.array.min() and saliency.array.max() <= 1.0
    assert saliency.array.max() > 0


def test_hippocampus_mask_and_saliency_in_input_geometry(shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[:2]
    out = tmp_path / "out"
    assert main(["analyze", *map(str, images), "--pipeline", "hippocampus-seg", "-o", str(out)]) == 0
    for image in images:
        folder = out / image.name.split(".")[0]
        report = json.loads((folder / "report.json").read_text())
        jsonschema.validate(report, load_schema())
        volume = read_volume(image)
        mask = read_volume(folder / "mask.nii.gz")
        assert mask.spatial_shape == volume.spatial_shape
        np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-5)
        assert set(np.unique(mask.array)) <= {0.0, 1.0, 2.0}
        _same_grid(folder / "saliency.nii.gz", volume)
        volumes = report["prediction"]["volumes_ml"]
        counted = {k: float((mask.array == i).sum()) * np.prod(volume.spacing) / 1000
                   for i, k in enumerate(("anterior", "posterior"), start=1)}
        for name in ("anterior", "posterior"):
            assert volumes[name] == pytest.approx(counted[name], abs=1e-3)
        assert report["saliency"]["method"] == "saliency"
        _check_html(folder)


def test_sample_data_wrong_inputs_are_rejected_or_flagged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sample = REPO / "sample_data"
    code = main(["analyze", str(sample / "ct_phantom"), str(sample / "mr_phantom.nii.gz"),
                 "--pipeline", "hippocampus-seg", "-o", str(out)])
    reports = _reports(out)
    by_format = {r["input"]["format"]: r for r in reports.values()}
    assert by_format["dicom"]["status"] == "rejected"  # a CT given to an MR pipeline
    assert "CT" in by_format["dicom"]["reason"]
    mr = by_format["nifti"]
    assert mr["status"] == "flagged"
    assert mr["qc"]["out_of_distribution"] is True  # a phantom is far from real hippocampi
    assert code == 1
    chest = main(["analyze", str(REPO / "sample_data" / "mr_phantom.nii.gz"), "--pipeline",
                  "chest-xray-pneumonia", "-o", str(tmp_path / "chest")])
    assert chest == 1
    report = next(iter(_reports(tmp_path / "chest").values()))
    assert report["status"] == "rejected" and "3D volume" in report["reason"]


def test_twelve_xrays_a_cut_header_and_a_text_file(shared_data: Path, tmp_path: Path,
                                                   capsys) -> None:
    """The batch from the dependability report: nothing is lost, the exit code says so."""
    folder = tmp_path / "in"
    folder.mkdir()
    for cls in ("NORMAL", "PNEUMONIA"):
        for source in sorted((shared_data / "chest_xray" / "train" / cls).glob("*.jpeg"))[:6]:
            shutil.copy(source, folder / source.name)
    mr = shared_data / "dicom" / "transfer_syntaxes" / "In" / "1.dcm"
    (folder / "mr_cut.dcm").write_bytes(mr.read_bytes()[:3000])  # cut inside the header
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--pipeline", "chest-xray-pneumonia", "-o",
                 str(out)]) == 1
    captured = capsys.readouterr()
    assert "13 studies: 12 ok, 1 rejected, 0 failed" in captured.out
    assert "1 file(s) skipped: not images (notes.txt)" in captured.err
    reports = _reports(out)
    assert "truncated" in reports["mr_cut.dcm"]["reason"]
    assert sorted(r["status"] for r in reports.values()).count("ok") == 12


def test_study_with_some_unreadable_files_goes_on_and_lists_them(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    """A real hippocampus MR series as DICOM with two broken slices: one cut short (refused
    from its header), one whose compressed pixel data does not decode. The study is analysed
    from the rest, lists both files, and is flagged: its result may not apply."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from conftest import mr_series_from_nifti

    image = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[3]
    files = mr_series_from_nifti(image, tmp_path / "mr")
    cut, garbled = files[10], files[20]
    cut.write_bytes(cut.read_bytes()[:-500])
    ds = pydicom.dcmread(garbled)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"\x7f" * 40])
    ds.save_as(garbled, enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "mr"), "--pipeline", "hippocampus-seg", "-o",
                 str(out)]) == 0
    (report,) = _reports(out).values()
    jsonschema.validate(report, load_schema())
    assert report["status"] == "flagged"
    assert "unreadable_files" in report["qc"]["flagged_by"]
    listed = {u["file"]: u["reason"] for u in report["input"]["unreadable_files"]}
    assert set(listed) == {cut.name, garbled.name}
    assert "truncated" in listed[cut.name]
    assert "pixel data" in listed[garbled.name]
    assert len(report["input"]["instance_uid_sha256"]) == len(files) - 2
    assert report["prediction"]["volumes_ml"]["anterior"] > 0
    page = (out / report["study"] / "report.html").read_text()
    assert cut.name in page and garbled.name in page
