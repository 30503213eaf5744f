"""DICOM results built from a study's report: the SR carries the QC decision."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medvision.cli.main import main
from medvision.pacs.results import write_results

from conftest import dcmtk_tool, pydicom_test_files, sr_content

RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def flagged_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """RG1 (an adult CR radiograph) through the paediatric chest pipeline: flagged."""
    root = tmp_path_factory.mktemp("rg1")
    out = root / "out"
    assert main(["analyze", str(RG1), "--pipeline", "chest-xray-pneumonia", "-o", str(out)]) == 0
    folder = next(p.parent for p in out.glob("*/report.json"))
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "flagged"
    return folder, report


def test_flagged_sr_carries_qc_ood_and_threshold(flagged_study: tuple[Path, dict],
                                                 tmp_path: Path) -> None:
    folder, report = flagged_study
    source = pydicom.dcmread(RG1)
    written = write_results(report, [source], folder, ("NORMAL", "PNEUMONIA"), tmp_path)
    assert {kind for _, _, kind in written} == {"SR", "SC"}
    overlay = pydicom.dcmread(next(path for _, path, kind in written if kind == "SC"))
    assert len(overlay.SeriesDescription) <= 64  # LO
    assert "NOT FOR DIAGNOSIS" in overlay.SeriesDescription
    sr = pydicom.dcmread(next(path for _, path, kind in written if kind == "SR"))
    items = sr_content(sr)
    assert items["Model finding"] == report["prediction"]["label"]
    assert items["Input quality check"] == "Flagged: result may not apply"
    assert items["Out of distribution"] == "Yes"
    assert items["Out-of-distribution distance"] == pytest.approx(report["qc"]["ood_distance"])
    assert items["Out-of-distribution threshold"] == pytest.approx(report["qc"]["ood_threshold"])
    assert items["Decision threshold"] == pytest.approx(report["prediction"]["threshold"])
    for cls, p in report["prediction"]["probabilities"].items():
        assert items[f"Probability of {cls}"] == pytest.approx(p)
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump:  # dcmtk reads it as a valid SR document
        text = subprocess.run([dsrdump, str(sr.filename)], capture_output=True, text=True,
                              check=True).stdout
        assert "Input quality check" in text and "Flagged" in text


def test_withheld_result_sr_says_so_and_nothing_else(flagged_study: tuple[Path, dict],
                                                     tmp_path: Path) -> None:
    folder, report = flagged_study
    withheld = json.loads(json.dumps(report))
    withheld.update(prediction=None, saliency=None)
    withheld["qc"]["withheld"] = True
    empty = tmp_path / "study"
    empty.mkdir()
    shutil.copy(folder / "report.json", empty / "report.json")
    source = pydicom.dcmread(RG1)
    source.SOPInstanceUID = generate_uid()
    written = write_results(withheld, [source], empty, ("NORMAL", "PNEUMONIA"), tmp_path / "out")
    assert [kind for _, _, kind in written] == ["SR"]
    items = sr_content(pydicom.dcmread(written[0][1]))
    assert items["Model finding"] == "Result withheld (input out of distribution)"
    assert not any(name.startswith("Probability") for name in items)
    assert items["Out of distribution"] == "Yes"


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    import shutil

    from conftest import require

    path = shutil.which("dciodvfy")
    require(path is not None, "dciodvfy is not installed (apt-get install dicom3tools)")
    return str(path)


def _errors(dciodvfy: str, path: Path) -> list[str]:
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_every_result_object_passes_dciodvfy(dciodvfy: str, shared_data: Path,
                                             tmp_path: Path,
                                             flagged_study: tuple[Path, dict]) -> None:
    """SR, SEG, Parametric Map and overlays of a real MR series, and the chest SR and overlay:
    no error from dicom3tools' validator (warnings about the private code scheme remain)."""
    from conftest import mr_series_from_nifti

    image = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[0]
    files = mr_series_from_nifti(image, tmp_path / "mr")
    assert main(["analyze", str(tmp_path / "mr"), "--pipeline", "hippocampus-seg", "-o",
                 str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out").glob("*/report.json")).parent
    report = json.loads((folder / "report.json").read_text())
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    written = write_results(report, sources, folder, ("background", "anterior", "posterior"),
                            tmp_path / "dcm")
    assert {kind for _, _, kind in written} == {"SR", "SEG", "PM", "SC"}
    chest_folder, chest_report = flagged_study
    written += write_results(chest_report, [pydicom.dcmread(RG1)], chest_folder,
                             ("NORMAL", "PNEUMONIA"), tmp_path / "chest")
    for _, path, kind in written:
        assert _errors(dciodvfy, path) == [], kind


def test_deidentified_copies_pass_dciodvfy(dciodvfy: str, tmp_path: Path) -> None:
    sources = [p for p in pydicom_test_files() if p.name in ("CT_small.dcm", "MR_small.dcm")]
    assert main(["deid", *map(str, sources), "-o", str(tmp_path / "out"), "--key-file",
                 str(tmp_path / "deid.key")]) == 0
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == 2
    for path in outputs:
        assert _errors(dciodvfy, path) == [], path.name
        assert all(len(v) <= 64 for v in pydicom.dcmread(path).DeidentificationMethod)
