"""DICOM results built from a study's report: the SR carries the QC decision."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from medvision.cli.main import main

from conftest import dcmtk_tool, pydicom_test_files, sr_content

RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def flagged_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """RG1 (an adult CR radiograph) through the paediatric chest pipeline with --dicom:
    flagged (out of distribution), with an SR and an overlay."""
    root = tmp_path_factory.mktemp("rg1")
    out = root / "out"
    assert main(["analyze", str(RG1), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--dicom", str(root / "copies"), "--fhir"]) == 0
    folder = next(p.parent for p in out.glob("*/report.json"))
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "flagged"
    return folder, report


@pytest.fixture(scope="module")
def mr_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[Path]]:
    """A real hippocampus MRI written as a DICOM MR series, analysed with --dicom."""
    from conftest import SHARED_DATA, mr_series_from_nifti, require

    root = tmp_path_factory.mktemp("mr")
    images = sorted((SHARED_DATA / "hippocampus" / "images").glob("*.nii.gz"))
    require(bool(images), "../shared/data/hippocampus is not available")  # a failure in CI
    files = mr_series_from_nifti(images[0], root / "mr")
    assert main(["analyze", str(root / "mr"), "--pipeline", "hippocampus-seg", "-o",
                 str(root / "out"), "--dicom", "--fhir"]) == 0
    folder = next((root / "out").glob("*/report.json")).parent
    return folder, json.loads((folder / "report.json").read_text()), files


def _written(folder: Path, report: dict) -> dict[str, list[Path]]:
    kinds: dict[str, list[Path]] = {}
    for item in report.get("dicom", []):
        kinds.setdefault(item["kind"], []).append(folder / item["file"])
    return kinds


def test_chest_radiograph_sr_has_the_report_numbers(flagged_study: tuple[Path, dict]) -> None:
    import highdicom as hd

    folder, report = flagged_study
    written = _written(folder, report)
    assert set(written) == {"SR", "SC"}
    assert (folder.parent.parent / "copies" / folder.name / "sr.dcm").is_file()
    overlay = pydicom.dcmread(written["SC"][0])
    assert len(overlay.SeriesDescription) <= 64  # LO
    assert "NOT FOR DIAGNOSIS" in overlay.SeriesDescription
    sr = hd.sr.srread(written["SR"][0])
    groups = sr.content.get_image_measurement_groups()
    by_finding = {g.finding_type.meaning: g for g in groups[1:]}
    probabilities = report["prediction"]["probabilities"]
    # standard codes from the pipeline file: SNOMED CT Normal and Pneumonia
    assert {(g.finding_type.value, g.finding_type.scheme_designator) for g in groups[1:]} == {
        ("17621005", "SCT"), ("233604007", "SCT")}
    for cls, meaning in (("NORMAL", "Normal"), ("PNEUMONIA", "Pneumonia")):
        (measurement,) = by_finding[meaning].get_measurements()
        assert (measurement.name.value, measurement.name.scheme_designator) == ("122157", "DCM")
        assert float(measurement.value) == pytest.approx(probabilities[cls])
    main_group = groups[0]
    label = report["prediction"]["label"]
    assert main_group.finding_type.meaning == label.capitalize()
    values = {m.name.meaning: float(m.value) for m in main_group.get_measurements()}
    assert values["Probability"] == pytest.approx(probabilities[label])
    assert values["Decision threshold"] == pytest.approx(report["prediction"]["threshold"])
    assert values["Out-of-distribution distance"] == pytest.approx(report["qc"]["ood_distance"])
    items = sr_content(pydicom.dcmread(written["SR"][0]))
    assert items["Quality Finding"] == "Flagged: result may not apply"
    assert items["Out of distribution"] == "Yes"
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump:  # dcmtk reads it as a valid SR document, with the same numbers
        text = subprocess.run([dsrdump, str(written["SR"][0])], capture_output=True, text=True,
                              check=True).stdout
        assert "Pneumonia" in text and "Flagged" in text
        assert f"{probabilities['PNEUMONIA']:.6f}"[:6] in text


def test_mr_series_gives_sr_seg_and_parametric_map_with_the_report_numbers(
        mr_study: tuple[Path, dict, list[Path]]) -> None:
    import highdicom as hd
    import nibabel as nib
    import numpy as np

    folder, report, files = mr_study
    written = _written(folder, report)
    assert set(written) == {"SR", "SEG", "PM", "SC"}
    sr = hd.sr.srread(written["SR"][0])
    volumes = {}
    for group in sr.content.get_image_measurement_groups()[1:]:
        (measurement,) = group.get_measurements()
        assert (measurement.name.value, measurement.name.scheme_designator) == (
            "118565006", "SCT")
        assert measurement.unit.value == "ml"
        volumes[group.tracking_identifier] = float(measurement.value)
        assert group.finding_type.value == "5366008"  # SNOMED CT Hippocampus
    expected = report["prediction"]["volumes_ml"]
    assert sorted(volumes.values()) == pytest.approx(sorted(expected.values()), abs=1e-4)
    seg = hd.seg.segread(written["SEG"][0])
    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj)
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        assert description.segmented_property_type.value == "5366008"
        assert description.segmented_property_category.meaning == "Anatomical Structure"
        label = ["background", "anterior", "posterior"].index(description.segment_label)
        frames = seg.get_volume(segment_numbers=[number], combine_segments=False) \
            if hasattr(seg, "get_volume") else None
        voxels = int((mask == label).sum())
        if frames is not None:
            assert int(np.asarray(frames.array).sum()) == voxels
    pm = pydicom.dcmread(written["PM"][0])
    assert int(pm.NumberOfFrames) == len(files)
    labels = json.loads((folder / "mask.labels.json").read_text())["labels"]
    assert [row["name"] for row in labels] == ["background", "anterior", "posterior"]
    assert labels[1]["code"] == {"scheme": "SCT", "value": "5366008", "meaning": "Hippocampus"}
    assert (folder / "mask.ctbl").read_text().splitlines()[3].startswith("1 anterior 230 25 75")
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump:
        text = subprocess.run([dsrdump, str(written["SR"][0])], capture_output=True, text=True,
                              check=True).stdout
        assert "Hippocampus" in text and "ml" in text


def test_standard_codes_are_in_the_dicom_dictionary() -> None:
    """The codes medvision uses whatever the pipeline are the DICOM standard's own."""
    from pydicom.sr.codedict import codes

    from medvision.report import dicom

    for value, scheme, meaning in (dicom.FINDING, dicom.PROBABILITY, dicom.VOLUME,
                                   dicom.QUALITY, dicom.YES, dicom.NO, dicom.TISSUE):
        keyword = "".join(w[:1].upper() + w[1:] for w in meaning.split())
        assert getattr(codes, scheme).__getattr__(keyword).value == value


@pytest.fixture(scope="module")
def dciodvfy() -> str:

    from conftest import require

    path = shutil.which("dciodvfy")
    require(path is not None, "dciodvfy is not installed (apt-get install dicom3tools)")
    return str(path)


def _errors(dciodvfy: str, path: Path) -> list[str]:
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_every_result_object_passes_dciodvfy(dciodvfy: str,
                                             mr_study: tuple[Path, dict, list[Path]],
                                             flagged_study: tuple[Path, dict]) -> None:
    """SR, SEG, Parametric Map and overlays of a real MR series, and the chest SR and overlay:
    no error from dicom3tools' validator (warnings about the private code scheme remain)."""
    paths = []
    for folder, report in ((mr_study[0], mr_study[1]), flagged_study):
        paths += [(kind, path) for kind, found in _written(folder, report).items()
                  for path in found]
    assert {kind for kind, _ in paths} == {"SR", "SEG", "PM", "SC"}
    for kind, path in paths:
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


def test_fhir_bundles_validate_and_carry_the_report_numbers(
        flagged_study: tuple[Path, dict], mr_study: tuple[Path, dict, list[Path]]) -> None:
    """FHIR R4 (R4B) Bundles, validated with fhir.resources; no patient identity in them."""
    from fhir.resources.R4B.bundle import Bundle

    for (folder, report), source in ((flagged_study, RG1), (mr_study[:2], mr_study[2][0])):
        text = (folder / "fhir.json").read_text()
        # the patient identity of the study's own source file appears nowhere in its bundle
        # (the Study Instance UID does, on purpose: the ImagingStudy must point the
        # hospital's systems at the study the findings are about)
        header = pydicom.dcmread(source, stop_before_pixels=True)
        identity = [str(header.PatientID), str(header.get("PatientBirthDate", "")),
                    str(header.get("AccessionNumber", "")),
                    *str(header.PatientName).split("^")]
        identity = [value for value in identity if len(value) >= 4]
        assert len(identity) >= 2, identity  # the check has something to find
        for value in identity:
            assert value not in text, value
        bundle = Bundle.model_validate_json(text)
        resources = {e.resource.get_resource_type() for e in bundle.entry}
        assert resources == {"DiagnosticReport", "Observation", "ImagingStudy", "Device"}
        values = {}
        for entry in bundle.entry:
            resource = entry.resource
            if resource.get_resource_type() == "Observation" and resource.valueQuantity:
                values[resource.note[0].text] = float(resource.valueQuantity.value)
        prediction = report["prediction"]
        for name, p in (prediction.get("probabilities") or {}).items():
            assert values[f"probability of {name}"] == pytest.approx(p, abs=1e-6)
        for name, ml in (prediction.get("volumes_ml") or {}).items():
            assert values[f"volume of {name}"] == pytest.approx(ml, abs=1e-4)
        assert "PatientName" not in text
        device = next(e.resource for e in bundle.entry
                      if e.resource.get_resource_type() == "Device")
        assert report["pipeline"]["weights_sha256"] in {v.value for v in device.version}


def test_a_series_with_a_slice_missing_still_gets_seg_and_parametric_map(
        shared_data: Path, tmp_path: Path) -> None:
    """One middle slice left out: the volume loads onto a regular grid with one plane more
    than there are files; the SEG and the Parametric Map are built over the slices that are
    present, each frame referencing its own source (before, both were silently left out)."""
    import highdicom as hd

    from conftest import mr_series_from_nifti

    images = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))
    files = mr_series_from_nifti(images[0], tmp_path / "mr")
    missing = files[len(files) // 2]
    missing.unlink()
    present = [p for p in files if p != missing]
    assert main(["analyze", str(tmp_path / "mr"), "--pipeline", "hippocampus-seg", "-o",
                 str(tmp_path / "out"), "--dicom"]) == 0
    folder = next((tmp_path / "out").glob("*/report.json")).parent
    report = json.loads((folder / "report.json").read_text())
    written = _written(folder, report)
    assert {"SR", "SEG", "PM"} <= set(written), written
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in present}
    pm = pydicom.dcmread(written["PM"][0])
    assert int(pm.NumberOfFrames) == len(present)
    referenced = {str(frame.DerivationImageSequence[0].SourceImageSequence[0]
                      .ReferencedSOPInstanceUID)
                  for frame in pm.PerFrameFunctionalGroupsSequence}
    assert referenced == sources
    seg = hd.seg.segread(written["SEG"][0])
    assert {str(uid) for _, _, uid in seg.get_source_image_uids()} <= sources
