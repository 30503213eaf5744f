"""De-identification of DICOM files (PS3.15 Basic Application Level Confidentiality Profile).

The attribute-level work is done by dicognito, a maintained implementation of the profile:
names, IDs, addresses and other identifying attributes are replaced by consistent fakes, UIDs
are remapped consistently (the same input UID always maps to the same output UID), and dates and
times are shifted by an offset that is constant for a patient, so intervals survive. Seeding it
with a secret key makes the pseudonyms reproducible for whoever holds the key.

On top of that we remove private attributes, mark the instance (Patient Identity Removed,
De-identification Method and its code sequence), and honour Burned In Annotation: an instance
that says YES (or does not say NO for modalities that often burn in text, like US, SC, XA) is
refused unless the caller accepts the risk, because the profile's Clean Pixel Data option is
not implemented.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medvision.errors import DataError, InvalidDicomError

__all__ = ["DeidResult", "deidentify"]

#: Modalities that often carry burned-in text when the flag is absent.
_RISKY_MODALITIES = {"US", "SC", "XA", "ES", "OT", "DOC"}


@dataclass
class DeidResult:
    """What a de-identification run did."""

    written: list[Path] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _burned_in(ds: object, allow_unknown: bool) -> str | None:
    flag = str(getattr(ds, "BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "Burned In Annotation is YES: pixel data may show identifying text"
    if not flag and not allow_unknown and str(getattr(ds, "Modality", "")).upper() in _RISKY_MODALITIES:
        return ("Burned In Annotation is absent for a modality that often burns in text; pass "
                "--allow-unknown-burned-in after checking the images")
    return None


def _mark(ds: object) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds.PatientIdentityRemoved = "YES"  # type: ignore[attr-defined]
    # LO allows 64 characters per value; the attribute is multi-valued, one step a value
    ds.DeidentificationMethod = [  # type: ignore[attr-defined]
        "medvision deid (dicognito)", "PS3.15 Basic Application Level Confidentiality Profile",
        "private tags removed", "dates shifted per patient"]
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)  # type: ignore[attr-defined]


def deidentify(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
               key: str, allow_unknown_burned_in: bool = False,
               force: bool = False) -> DeidResult:
    """De-identify every DICOM file under ``paths`` into ``out_dir``.

    Outputs are named by their new UIDs (``<study>/<series>/<instance>.dcm``), never by the
    input names, which may themselves identify someone.

    Args:
        paths: files and folders (recursive).
        out_dir: output folder.
        key: secret seed; the same key gives the same pseudonyms, UIDs and date shifts.
        allow_unknown_burned_in: accept instances without a Burned In Annotation value.
        force: overwrite existing output files.

    Raises:
        DataError: an output exists and ``force`` is false.
    """
    import pydicom

    from medvision.extras import require

    require("dicognito", "deid", "de-identification")
    from dicognito.anonymizer import Anonymizer

    from medvision.io.dicom_files import iter_candidate_files

    anonymizer = Anonymizer(seed=key)
    out = Path(out_dir)
    result = DeidResult()
    for path in iter_candidate_files(paths):
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as e:
            result.refused.append((str(path), f"not readable as DICOM ({e})"))
            continue
        if "DirectoryRecordSequence" in ds:
            result.refused.append((str(path), "a DICOMDIR (rebuild it from the outputs)"))
            continue
        reason = _burned_in(ds, allow_unknown_burned_in)
        if reason:
            result.refused.append((str(path), reason))
            continue
        try:
            anonymizer.anonymize(ds)
            ds.remove_private_tags()
            _mark(ds)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise InvalidDicomError(f"{path}: cannot de-identify ({e})") from e
        target = out / str(ds.get("StudyInstanceUID", "study")) / str(
            ds.get("SeriesInstanceUID", "series")) / f"{ds.SOPInstanceUID}.dcm"
        if target.exists() and not force:
            raise DataError(f"{target} exists; pass --force to overwrite")
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        result.written.append(target)
    return result
