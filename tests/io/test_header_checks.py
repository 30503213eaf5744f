"""Header values checked at the boundary: the UI syntax of PS3.5 9.1 and the values results
copy, on real files (pydicom's test files, the shared scans) and on hostile values."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvision.errors import InvalidDicomError
from medvision.io.dicom_series import scan_dicom
from medvision.io.header_checks import (
    check_copied_values,
    check_dataset_uids,
    check_uid,
    uid_problem,
)

from conftest import pydicom_test_files

VALID = ["1.2.840.10008.5.1.4.1.1.7", "1", "1.0.2", "2.25." + "9" * 38, "2." + "2" * 62]
INVALID = {
    "../../tools/shutdown": "characters other than digits and dots",
    "1.2/3": "characters other than digits and dots",
    "1.2.03": "leading zero",
    "1..2": "empty component",
    ".1.2": "empty component",
    "1.2.": "empty component",
    "1." + "2" * 63: "characters (at most 64)",
    "1.2\\1.3": "more than one value",
    "1.2\x003": "characters other than digits and dots",
    "": "empty",
    "1.2.3 ": "characters other than digits and dots",
    "١.٢": "characters other than digits and dots",  # Arabic-Indic digits are not digits here
    "0": "root",
    "3.4": "root",
    "1.40.2": "root",
    "2.999.1": "example root",
}


@pytest.mark.parametrize("value", VALID)
def test_valid_uids(value: str) -> None:
    assert uid_problem(value) is None
    assert check_uid(value, "StudyInstanceUID") == value


@pytest.mark.parametrize(("value", "why"), INVALID.items())
def test_invalid_uids_say_why_and_name_the_attribute(value: str, why: str) -> None:
    problem = uid_problem(value)
    assert problem is not None and why.split()[0] in problem, problem
    with pytest.raises(InvalidDicomError, match="StudyInstanceUID is not a valid DICOM UID") as e:
        check_uid(value, "StudyInstanceUID")
    if value and value not in "0123456789.":
        assert value not in str(e.value)  # the hostile value itself is never repeated


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_valid_exactly_when_it_matches_the_grammar(value: str) -> None:
    components = value.split(".")
    grammar = (0 < len(value) <= 64 and all(
        c and c.isascii() and c.isdigit() and (c == "0" or not c.startswith("0"))
        for c in components))
    grammar = grammar and components[0] in ("1", "2") and components[:2] != ["2", "999"] and (
        components[0] == "2" or len(components) == 1 or int(components[1]) < 40)
    assert (uid_problem(value) is None) == grammar


def test_every_real_file_passes(shared_data: Path) -> None:
    """The readers' references (real CT, MR, 4D DICOM) and pydicom's test files: the check
    refuses none but three pydicom files: one whose SOP Instance UID is a hex digest, two
    whose Media Storage SOP Instance UID is under the unregistered root 999."""
    refused = {"bad_sequence.dcm": "SOPInstanceUID", "color-pl.dcm": "MediaStorageSOPInstanceUID",
               "color-px.dcm": "MediaStorageSOPInstanceUID"}
    checked = 0
    for path in [*sorted((shared_data / "dicom").rglob("*")), *pydicom_test_files()]:
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (a reference NIfTI, a JSON sidecar)
            continue
        checked += 1
        if path.name in refused:
            with pytest.raises(InvalidDicomError, match=refused[path.name]):
                check_dataset_uids(ds, required=())
            continue
        check_dataset_uids(ds, required=())
    assert checked > 300


def _radiograph(tmp_path: Path, **values: object) -> Path:
    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / "image.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(("keyword", "value"), [
    ("StudyInstanceUID", "../../tools/shutdown"),
    ("SeriesInstanceUID", "1.2\\1.3"),
    ("SOPInstanceUID", "1." + "2" * 198),
    ("FrameOfReferenceUID", "1.2/3"),
    ("SOPClassUID", "1.02.3"),
])
def test_the_reader_refuses_a_bad_uid_naming_the_attribute(tmp_path: Path, keyword: str,
                                                             value: str) -> None:
    path = _radiograph(tmp_path, **{keyword: value})
    result = scan_dicom([path])
    assert not result.series
    ((where, why),) = result.rejected
    assert where == str(path) and f"{keyword} is not a valid DICOM UID" in why


def test_a_referenced_uid_and_the_transfer_syntax_are_checked(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3/../4"
    path = _radiograph(tmp_path, ReferencedImageSequence=[item])
    with pytest.raises(InvalidDicomError, match=r"ReferencedImageSequence\[0\]\."
                                                r"ReferencedSOPInstanceUID"):
        check_dataset_uids(pydicom.dcmread(path))
    ds = pydicom.dcmread(_radiograph(tmp_path))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1/x"
    with pytest.raises(InvalidDicomError, match="TransferSyntaxUID"):
        check_dataset_uids(ds)


@pytest.mark.parametrize(("keyword", "value", "why"), [
    ("PatientID", "X" * 200, "too long"),
    ("AccessionNumber", "A" * 17, "too long"),
    ("PatientName", "SMITH\x00JOHN", "control characters"),
    ("PatientID", "MRN\\778899", "2 values"),
    ("PatientName", "Müller^Jürgen", "outside ASCII"),
    ("StudyDate", "2026-13-45", "not a valid DA"),
])
def test_values_results_copy_are_checked(tmp_path: Path, keyword: str, value: str,
                                         why: str) -> None:
    ds = pydicom.dcmread(_radiograph(tmp_path))
    if "SpecificCharacterSet" in ds:  # CT_small declares ISO_IR 100
        del ds.SpecificCharacterSet
    setattr(ds, keyword, value)
    with pytest.raises(InvalidDicomError, match=keyword) as e:
        check_copied_values(ds)
    assert why in str(e.value) and value not in str(e.value)


def test_non_ascii_names_with_a_character_set_pass(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_radiograph(tmp_path))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    check_copied_values(ds)


def test_reading_asks_the_syntax_results_ask_a_registered_root(tmp_path: Path) -> None:
    """Test data often uses roots like 9: readable, but not a UID to send in a result."""
    path = _radiograph(tmp_path, SeriesInstanceUID="9.9.9")
    assert scan_dicom([path]).series and not scan_dicom([path]).rejected
    with pytest.raises(InvalidDicomError, match="SeriesInstanceUID .* root"):
        check_dataset_uids(pydicom.dcmread(path))
    assert uid_problem("9.9.9", registered_root=False) is None
