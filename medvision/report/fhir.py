"""A study's result as FHIR R4 (R4B): a ``Bundle`` of a ``DiagnosticReport``, its
``Observation``s, the ``ImagingStudy`` it reads and the algorithm as a ``Device``.

Built from the in-memory :class:`~medvision.report.study.StudyReport` and validated with
``fhir.resources`` (``pip install 'medvision[fhir]'``). No patient identity: the subject is the
keyed pseudonym of the Patient ID (or of the study when there is none), as in the audit log,
unless the caller passes a ``subject`` reference it has mapped itself. Every resource is
``preliminary``: an unverified algorithm output.

Observations: the finding (the predicted class's code from the pipeline's ``report.classes``),
the probability of each class (DCM 122157), each segmented volume (SCT 118565006, mL), each
detected-object count, and the quality check (passed, flagged or withheld, with the
out-of-distribution distance).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from medvision._version import __version__
from medvision.errors import ReportError

if TYPE_CHECKING:
    from medvision.config import Pipeline
    from medvision.report.study import StudyReport

__all__ = ["fhir_bundle", "render_fhir"]

_SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
            "LN": "http://loinc.org", "RADLEX": "http://radlex.org",
            "99MEDVISION": "urn:medvision:codes"}
UCUM = "http://unitsofmeasure.org"


def _coding(scheme: str, value: str, meaning: str) -> dict[str, Any]:
    return {"coding": [{"system": _SYSTEMS.get(scheme, f"urn:scheme:{scheme}"), "code": value,
                        "display": meaning}], "text": meaning}


def _class_coding(pipeline: Pipeline, name: str) -> dict[str, Any]:
    declared = pipeline.report.classes.get(name)
    if declared is not None and declared.code is not None:
        code = declared.code
        return _coding(code.scheme, code.value, code.meaning)
    return _coding("99MEDVISION", name[:16], name)


def _uid(seed: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, seed))


def fhir_bundle(report: StudyReport, pipeline: Pipeline, *, subject_key: str,
                subject: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Bundle as JSON-ready data, validated with ``fhir.resources`` (R4B).

    Args:
        subject_key: the pseudonym that identifies the subject when ``subject`` is not given.
        subject: a FHIR Reference to use instead (an operator's own patient mapping).

    Raises:
        MissingDependencyError: ``fhir.resources`` is not installed.
        ReportError: the resources do not validate.
    """
    from medvision.extras import require

    require("fhir.resources", "fhir", "FHIR output")
    seed = f"{report.study}/{report.pipeline.weights_sha256}/{report.run.get('input_sha256')}"
    ref = subject or {"identifier": {"system": "urn:medvision:pseudonym", "value": subject_key},
                      "display": "pseudonymous subject"}
    device_id, study_id, report_id = _uid(seed + "/device"), _uid(seed + "/study"), \
        _uid(seed + "/report")
    p = report.pipeline
    device = {"resourceType": "Device", "id": device_id, "status": "active",
              "manufacturer": "medvision",
              "deviceName": [{"name": f"medvision {p.name}", "type": "model-name"}],
              "version": [{"type": {"text": "pipeline"}, "value": p.version},
                          {"type": {"text": "medvision"}, "value": __version__},
                          {"type": {"text": "weights SHA-256"}, "value": p.weights_sha256},
                          {"type": {"text": "config SHA-256"}, "value": p.config_hash}]}
    study: dict[str, Any] = {"resourceType": "ImagingStudy", "id": study_id, "status": "available",
                             "subject": ref}
    if report.sources:
        uid = str(report.sources[0].get("StudyInstanceUID") or "")
        if uid:
            study["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
        modality = str(report.sources[0].get("Modality") or "")
        if modality:
            study["modality"] = [{"system": _SYSTEMS["DCM"], "code": modality}]
    observations: list[dict[str, Any]] = []

    def observe(key: str, code: dict[str, Any], **value: Any) -> None:
        observations.append({"resourceType": "Observation", "id": _uid(f"{seed}/{key}"),
                             "status": "preliminary", "code": code, "subject": ref,
                             "device": {"reference": f"Device/{device_id}"},
                             "derivedFrom": [{"reference": f"ImagingStudy/{study_id}"}],
                             **value})

    prediction = report.prediction
    if prediction is not None:
        for name in prediction.label.split("+"):
            if name in prediction.classes:
                observe(f"finding-{name}", _coding("DCM", "121071", "Finding"),
                        valueCodeableConcept=_class_coding(pipeline, name))
        for name, value in zip(prediction.classes, prediction.probabilities or (), strict=False):
            observe(f"p-{name}", _coding("DCM", "122157", "Probability"),
                    valueQuantity={"value": round(float(value), 6), "unit": "1",
                                   "system": UCUM, "code": "1"},
                    focus=None, note=[{"text": f"probability of {name}"}])
        for name, ml in prediction.volumes_ml.items():
            observe(f"v-{name}", _coding("SCT", "118565006", "Volume"),
                    valueQuantity={"value": round(float(ml), 4), "unit": "mL", "system": UCUM,
                                   "code": "mL"}, note=[{"text": f"volume of {name}"}])
        for name, count in prediction.counts.items():
            observe(f"n-{name}", _coding("99MEDVISION", "COUNT", "Number of objects found"),
                    valueInteger=int(count), note=[{"text": f"{name} found"}])
    qc_state = ("withheld" if report.qc.withheld else
                "flagged" if report.status == "flagged" else "passed")
    quality: dict[str, Any] = {"valueCodeableConcept": _coding(
        "99MEDVISION", qc_state.upper(), f"Input quality check {qc_state}")}
    if report.qc.ood_distance is not None:
        quality["component"] = [{
            "code": _coding("99MEDVISION", "OOD-DIST", "Out-of-distribution distance"),
            "valueQuantity": {"value": round(float(report.qc.ood_distance), 4), "unit": "1",
                              "system": UCUM, "code": "1"}}]
    observe("qc", _coding("DCM", "111052", "Quality Finding"), **quality)
    for item in observations:  # drop keys given as None
        for key in [k for k, v in item.items() if v is None]:
            del item[key]
    conclusion = (prediction.label if prediction is not None else "no result") + (
        f" ({report.status}: {report.reason})" if report.reason else "")
    diagnostic = {"resourceType": "DiagnosticReport", "id": report_id, "status": "preliminary",
                  "code": _coding("LN", "18748-4", "Diagnostic imaging study"),
                  "subject": ref, "issued": report.created,
                  "performer": [{"reference": f"Device/{device_id}",
                                 "display": f"medvision {p.name} {p.version}"}],
                  "imagingStudy": [{"reference": f"ImagingStudy/{study_id}"}],
                  "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
                  "conclusion": conclusion[:1000]}
    if prediction is not None:
        diagnostic["conclusionCode"] = [_class_coding(pipeline, n) for n in
                                        prediction.label.split("+") if n in prediction.classes]
    resources: list[dict[str, Any]] = [diagnostic, device, study, *observations]
    bundle = {"resourceType": "Bundle", "id": _uid(seed + "/bundle"), "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
    try:
        from fhir.resources.R4B.bundle import Bundle

        Bundle.model_validate(bundle)
    except Exception as e:  # noqa: BLE001 - pydantic and fhir_core raise several kinds
        raise ReportError(f"FHIR resources do not validate: {e}") from e
    return bundle


def render_fhir(report: StudyReport, pipeline: Pipeline, *, subject_key: str) -> str:
    """``fhir.json``'s text."""
    return json.dumps(fhir_bundle(report, pipeline, subject_key=subject_key), indent=2)
