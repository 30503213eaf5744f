"""Header values checked at the boundary: UIDs (PS3.5 9.1) and the values results copy.

A UID is one or more components separated by dots; a component is ``0`` or digits without a
leading zero; the whole is at most 64 characters and single-valued. Every UID that a received
or read instance carries is checked against this syntax before anything is filed, analysed,
built into a path or a URL, or copied into a result: a ``../../tools/shutdown`` Study Instance
UID is refused where it arrives, naming the attribute.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

from medvision.errors import InvalidDicomError

__all__ = ["COPIED_ATTRIBUTES", "EQUIPMENT_ATTRIBUTES", "MAX_UID_LENGTH", "REQUIRED_UIDS",
           "check_copied_values", "check_dataset_uids", "check_uid", "copied_value_problem",
           "uid_problem"]

#: PS3.5 9.1: at most 64 characters.
MAX_UID_LENGTH = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
#: UIDs every filed instance (and every source of DICOM results) must carry.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Sequences whose items' UIDs are checked (references the results copy or follow).
_CHECKED_SEQUENCES = ("ReferencedImageSequence", "SourceImageSequence",
                      "ReferencedSeriesSequence", "ReferencedStudySequence",
                      "ReferencedInstanceSequence", "ReferencedFrameOfReferenceSequence",
                      "ReferencedSOPSequence", "DerivationImageSequence",
                      "ReferencedPerformedProcedureStepSequence")
#: Deepest nesting of checked sequences followed.
_MAX_DEPTH = 4


def uid_problem(value: Any, *, registered_root: bool = True) -> str | None:
    """Why ``value`` is not a valid UID, or ``None`` when it is one.

    ``value`` is what pydicom returns for a UI element: a ``str`` (``UID``), a ``MultiValue``
    for a backslash-separated value, ``None`` or bytes for an unparsed one. With
    ``registered_root`` it must also sit under an ISO/ITU-T root as validators (dciodvfy)
    require of objects that are sent: ``1`` (second arc below 40) or ``2``, not the example
    root ``2.999``. Reading alone asks only the PS3.5 syntax (test data uses roots like 9).
    """
    if value is None:
        return "empty"
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return "not ASCII"
    if not isinstance(value, str):
        try:
            count = len(value)
        except TypeError:
            return f"not a string ({type(value).__name__})"
        return f"{count} values where one is allowed"
    # pydicom strips the trailing NUL pad of an even-length value; anything left over is wrong
    text = str(value)
    if not text:
        return "empty"
    if len(text) > MAX_UID_LENGTH:
        return f"{len(text)} characters (at most {MAX_UID_LENGTH})"
    if "\\" in text:
        return "more than one value"
    if not _UID.fullmatch(text):
        if not set(text) <= set("0123456789."):
            return "characters other than digits and dots"
        return "an empty component or one with a leading zero"
    if not registered_root:
        return None
    # an ISO 8824 object identifier, as validators (dciodvfy) hold UIDs to: a registered root
    arcs = text.split(".")
    if arcs[0] not in ("1", "2") or (arcs[0] == "1" and len(arcs) > 1 and int(arcs[1]) >= 40):
        return "not under an ISO/ITU-T root (1 or 2)"
    if arcs[:2] == ["2", "999"]:
        return "under the example root 2.999"
    return None


def check_uid(value: Any, attribute: str, *, registered_root: bool = True) -> str:
    """``value`` as a ``str`` when it is a valid UID (see :func:`uid_problem`).

    Raises:
        InvalidDicomError: it is not, naming ``attribute`` (the value itself is not repeated:
            it came from outside and may be anything).
    """
    problem = uid_problem(value, registered_root=registered_root)
    if problem is not None:
        raise InvalidDicomError(f"{attribute} is not a valid DICOM UID: {problem} "
                                "(PS3.5 9.1: digits and dots, no empty or leading-zero "
                                "components, at most 64 characters, one value)")
    return str(value)


def _ui_elements(ds: Any, path: str, depth: int) -> Iterator[tuple[str, Any]]:
    """``(attribute path, value)`` of the standard UI elements of ``ds`` and of the checked
    sequences' items. Only those elements are converted: the rest (pixel data above all)
    stay as read."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr == "UI":
            yield f"{path}{keyword_for_tag(tag)}", ds[tag].value
        elif vr == "SQ" and depth < _MAX_DEPTH and keyword_for_tag(tag) in _CHECKED_SEQUENCES:
            items = ds[tag].value or []
            for n, item in enumerate(items):
                yield from _ui_elements(item, f"{path}{keyword_for_tag(tag)}[{n}].", depth + 1)


def check_dataset_uids(ds: Any, *, required: tuple[str, ...] = REQUIRED_UIDS,
                       registered_root: bool = True) -> None:
    """Check every UID of a received or read dataset: the file meta (Transfer Syntax, Media
    Storage SOP Class and Instance), every standard UI attribute at the top level, and those in
    the reference sequences that results copy. ``required`` ones must be present;
    ``registered_root``: see :func:`uid_problem`.

    Raises:
        InvalidDicomError: a UID is missing, malformed or multi-valued, naming the attribute.
    """
    for keyword in required:
        if keyword not in ds:
            raise InvalidDicomError(f"{keyword} is missing")
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for attribute, value in _ui_elements(meta, "", _MAX_DEPTH):
            # the writer's own implementation class is not used here (and old toolkits
            # wrote unregistered ones)
            if attribute != "ImplementationClassUID" and value is not None and value != "":
                check_uid(value, attribute, registered_root=registered_root)
    for attribute, value in _ui_elements(ds, "", 0):
        if attribute.rsplit(".", 1)[-1] in required or (value is not None and value != ""):
            check_uid(value, attribute, registered_root=registered_root)


#: Patient and study attributes (the root attributes of every Patient and Study IE module,
#: PS3.3; what highdicom copies into an SR, SEG or Parametric Map from its source, and
#: overlays copy a part of): a value that breaks its VR would make every result invalid.
COPIED_ATTRIBUTES = ("AccessionNumber", "AdditionalPatientHistory", "AdmissionID",
                     "AdmittingDiagnosesDescription", "Allergies",
                     "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
                     "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolID",
                     "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
                     "ClinicalTrialSiteName", "ClinicalTrialSponsorName",
                     "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
                     "ClinicalTrialTimePointDescription", "ClinicalTrialTimePointID",
                     "ConsultingPhysicianName", "DeidentificationMethod",
                     "IssuerOfClinicalTrialProtocolID", "IssuerOfClinicalTrialSiteID",
                     "IssuerOfClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectReadingID",
                     "IssuerOfClinicalTrialTimePointID", "IssuerOfPatientID",
                     "LastMenstrualDate", "LongitudinalTemporalEventType",
                     "LongitudinalTemporalOffsetFromEvent", "MeasuredAPDimension",
                     "MeasuredLateralDimension", "MedicalAlerts",
                     "NameOfPhysiciansReadingStudy", "Occupation", "OtherPatientNames",
                     "PatientAge", "PatientAlternativeCalendar", "PatientBirthDate",
                     "PatientBirthDateInAlternativeCalendar", "PatientBirthTime",
                     "PatientBodyMassIndex", "PatientBreedDescription", "PatientComments",
                     "PatientDeathDateInAlternativeCalendar", "PatientID",
                     "PatientIdentityRemoved", "PatientName", "PatientSex",
                     "PatientSexNeutered", "PatientSize", "PatientSpeciesDescription",
                     "PatientState", "PatientWeight", "PhysiciansOfRecord", "PregnancyStatus",
                     "QualityControlSubject", "ReasonForVisit", "ReferringPhysicianName",
                     "RequestingService", "ResponsibleOrganization", "ResponsiblePerson",
                     "ResponsiblePersonRole", "ServiceEpisodeDescription", "ServiceEpisodeID",
                     "SmokingStatus", "StrainAdditionalInformation", "StrainDescription",
                     "StrainNomenclature", "StudyDate", "StudyDescription", "StudyID",
                     "StudyTime", "TypeOfPatientID")
#: What highdicom's Contributing Equipment Sequence copies from a source image.
EQUIPMENT_ATTRIBUTES = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions",
                        "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName",
                        "InstitutionAddress", "StationName", "AcquisitionDateTime",
                        "AcquisitionDate", "AcquisitionTime")
_CONTROL = {chr(c) for c in range(32)} - {"\x1b"}  # ESC starts ISO 2022 code extensions


@functools.cache
def _dictionary(keyword: str) -> tuple[int, str, str]:
    """(tag, VR, VM) of a keyword, looked up once."""
    from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag), dictionary_VM(tag)


def copied_value_problem(ds: Any, keyword: str) -> str | None:
    """Why the value of ``keyword`` cannot be copied into a valid result, or ``None``."""
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    tag, vr, vm = _dictionary(keyword)
    if tag not in ds:  # a tag lookup: this runs for every received instance
        return None
    value = ds[tag].value
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list):
        if vm == "1" and len(value) > 1:
            return f"{len(value)} values where one is allowed"
        values = list(value)
    else:
        values = [value]
    for item in values:
        text = str(item)
        if set(text) & _CONTROL:
            return "control characters"
        if not text.isascii() and "SpecificCharacterSet" not in ds:
            return "characters outside ASCII without a Specific Character Set"
        if vr in ("DS", "IS"):  # validated as written, not as the number pydicom made of it
            item = getattr(item, "original_string", None) or text
        try:
            validate_value(vr, item, config.RAISE)
        except (ValueError, TypeError) as e:
            # pydicom quotes the value in some messages: keep only what it says of the VR
            message = str(e)
            return ("too long for its VR" if "length" in message else
                    f"not a valid {vr} value")
    return None


def check_copied_values(ds: Any) -> None:
    """Check the values results copy (:data:`COPIED_ATTRIBUTES`,
    :data:`EQUIPMENT_ATTRIBUTES`) against their VRs.

    Raises:
        InvalidDicomError: one cannot be copied into a valid object, naming the attribute.
    """
    for keyword in (*COPIED_ATTRIBUTES, *EQUIPMENT_ATTRIBUTES):
        problem = copied_value_problem(ds, keyword)
        if problem is not None:
            raise InvalidDicomError(f"{keyword} cannot be copied into valid DICOM results: "
                                    f"{problem}")
