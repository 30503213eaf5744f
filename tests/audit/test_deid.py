"""``medvision deid``: pixels kept, identity gone, pseudonyms reproducible with the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from medvision.cli.main import main

REPO = Path(__file__).resolve().parents[2]

IDENTIFYING = {
    "PatientName": "Secret^Person^A", "PatientID": "ID-55-SECRET", "PatientBirthDate": "19330405",
    "OtherPatientIDs": "OTHER-ID-991", "PatientAddress": "12 Hidden Lane, Nowhere",
    "PatientTelephoneNumbers": "555-0199-321", "ReferringPhysicianName": "Refer^Doctor^Z",
    "PerformingPhysicianName": "Perform^Doctor^Y", "OperatorsName": "Operator^Oscar",
    "InstitutionName": "Hospital Of Secrets", "InstitutionAddress": "1 Secret Road",
    "AccessionNumber": "ACC-778899", "StudyID": "STUDY-4242", "StationName": "STATION-SECRET",
    "RequestingPhysician": "Request^Doctor^X", "PhysiciansOfRecord": "Record^Doctor^W",
}


@pytest.fixture
def identified(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    shutil.copytree(REPO / "sample_data" / "ct_phantom", folder)
    for path in sorted(folder.glob("*.dcm"))[:10]:
        ds = pydicom.dcmread(path)
        for key, value in IDENTIFYING.items():
            setattr(ds, key, value)
        ds.add_new((0x0009, 0x0010), "LO", "SECRET PRIVATE")
        ds.add_new((0x0009, 0x1001), "LO", "private-secret-value")
        ds.BurnedInAnnotation = "NO"
        ds.save_as(path)
    for path in sorted(folder.glob("*.dcm"))[10:]:
        path.unlink()
    return folder


def _outputs(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))]


def test_deid_profile(identified: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    out = tmp_path / "out"
    assert main(["deid", str(identified), "-o", str(out), "--key-file", str(key)]) == 0
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
                 for p in identified.glob("*.dcm")}
    results = _outputs(out)
    assert len(results) == 10
    raw = b"".join(p.read_bytes() for p in out.rglob("*.dcm"))
    for value in [*IDENTIFYING.values(), "private-secret-value", "DEMO^PHANTOM", "MV-DEMO-0001"]:
        assert value.encode() not in raw, value
    for ds in results:
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert not any(e.tag.is_private for e in ds)
    # consistent UID remapping: one study, one series, all new
    assert len({ds.StudyInstanceUID for ds in results}) == 1
    assert len({ds.SeriesInstanceUID for ds in results}) == 1
    old_study = next(iter(originals.values())).StudyInstanceUID
    assert results[0].StudyInstanceUID != old_study
    assert not set(originals) & {ds.SOPInstanceUID for ds in results}
    # dates shifted, consistently for the patient
    assert len({ds.StudyDate for ds in results}) == 1
    assert results[0].StudyDate != next(iter(originals.values())).StudyDate
    # pixel data identical: match each output to its source by slice position
    by_position = {tuple(map(float, d.ImagePositionPatient)): d for d in originals.values()}
    for ds in results:
        source = by_position[tuple(map(float, ds.ImagePositionPatient))]
        assert ds.PixelData == source.PixelData


def test_same_key_same_pseudonyms_other_key_differs(identified: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    runs = []
    for name in ("a", "b"):
        assert main(["deid", str(identified), "-o", str(tmp_path / name), "--key-file", str(key)]) == 0
        runs.append(_outputs(tmp_path / name))
    assert main(["deid", str(identified), "-o", str(tmp_path / "c"), "--key-file",
                 str(tmp_path / "other-key")]) == 0
    other = _outputs(tmp_path / "c")

    def identity(results: list[pydicom.Dataset]) -> tuple:
        first = results[0]
        return (str(first.PatientName), first.PatientID, first.StudyInstanceUID, first.StudyDate,
                sorted(ds.SOPInstanceUID for ds in results))

    assert identity(runs[0]) == identity(runs[1])
    assert identity(other)[:3] != identity(runs[0])[:3]


def test_burned_in_annotation_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(REPO / "sample_data" / "ct_phantom" / "IM0001.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(folder / "burned.dcm")
    code = main(["deid", str(folder), "-o", str(tmp_path / "out"), "--key-file",
                 str(tmp_path / "key")])
    assert code == 1
    assert not list((tmp_path / "out").rglob("*.dcm"))
