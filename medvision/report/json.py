"""The per-study ``report.json``: rendered from a :class:`StudyReport`, validated against its
JSON Schema.

The schema lives in ``medvision/report/report.schema.json`` (documented in
``docs/report.md``). ``schema_version`` follows semantic versioning: a new optional field is a
minor bump, anything that can break a reader is a major one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from medvision.errors import ReportError

if TYPE_CHECKING:
    from medvision.report.study import StudyReport

__all__ = ["SCHEMA_VERSION", "load_schema", "render_json", "to_document", "validate_report"]

SCHEMA_VERSION = "1.8.0"


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The report JSON Schema (draft 2020-12)."""
    text = resources.files("medvision.report").joinpath("report.schema.json").read_text()
    return dict(json.loads(text))


@lru_cache(maxsize=1)
def _validator() -> Any:
    """The schema's validator, the schema itself checked once (checking it on every report
    cost more than writing the report's figures)."""
    import jsonschema

    schema = load_schema()
    kind = jsonschema.validators.validator_for(schema)
    kind.check_schema(schema)
    return kind(schema)


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`ReportError` naming the first problem if ``report`` breaks the schema."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(report))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ReportError(f"report does not match schema {SCHEMA_VERSION} at {where}: "
                          f"{error.message}")


def _flag(flag: Any) -> dict[str, str]:
    return {"code": flag.code, "severity": str(flag.severity), "message": flag.message}


def to_document(report: StudyReport) -> dict[str, Any]:
    """The report as the JSON document of schema :data:`SCHEMA_VERSION` (validated)."""
    inp = report.input
    section: dict[str, Any] = {
        "study_key": inp.study_key, "source_name": inp.source_name, "format": inp.format,
        "modality": inp.modality, "series_key_sha256": inp.series_key_sha256,
        "instance_uid_sha256": list(inp.instance_uid_sha256), "geometry": None}
    if inp.geometry is not None:
        g = inp.geometry
        section["geometry"] = {"shape": list(g.shape), "spacing_mm": list(g.spacing_mm),
                               "orientation": g.orientation,
                               "affine": [list(row) for row in g.affine]}
        if not g.spacing_known:
            section["geometry"]["spacing_known"] = False
    if inp.unreadable_files:
        section["unreadable_files"] = [{"file": u.file, "reason": u.reason}
                                       for u in inp.unreadable_files]
    if inp.phi is not None:
        section["phi"] = dict(inp.phi)
    if inp.synthetic is not None:
        section["synthetic"] = dict(inp.synthetic)
    p = report.pipeline
    pipeline = {"name": p.name, "version": p.version, "task": p.task,
                "weights_sha256": p.weights_sha256, "config_hash": p.config_hash,
                "temperature": p.temperature, "backend": p.backend,
                "calibration": p.calibration}
    if p.members:
        pipeline["members"] = [dict(m) for m in p.members]
    if p.class_names:
        pipeline["class_names"] = dict(p.class_names)
    if p.device:
        pipeline["device"] = dict(p.device)
    files = report.files
    prediction: dict[str, Any] | None = None
    if report.prediction is not None:
        pred = report.prediction
        prediction = {"label": pred.label,
                      "calibrated": pipeline["calibration"] != "uncalibrated"}
        if pred.probabilities is not None:
            prediction["probabilities"] = dict(zip(pred.classes, pred.probabilities,
                                                   strict=True))
            prediction["threshold"] = pred.threshold
        if pred.boxes is not None:
            prediction["counts"] = dict(pred.counts)
            prediction["threshold"] = None
            prediction["detections"] = detections(report)
        if pred.mask is not None or pred.volumes_ml:
            prediction["mask_file"] = files.get("mask")
            prediction["volumes_ml"] = {k: round(v, 4) for k, v in pred.volumes_ml.items()}
        # the same words as the study page (one source: the prediction itself)
        prediction["finding"] = finding_sentence(prediction_values(pred), p.class_names)
    saliency: dict[str, Any] | None = None
    if report.saliency is not None:
        saliency = {"method": report.saliency.method, "params": dict(report.saliency.params),
                    "target": report.saliency.target,
                    "files": {"nifti": files.get("saliency"),
                              "png": list(files.get("overlays", []))},
                    "faithfulness": dict(report.faithfulness) if report.faithfulness else None}
    qc = report.qc
    qc_section: dict[str, Any] = {"flags": [_flag(f) for f in qc.flags]}
    if report.prediction is not None or qc.withheld or qc.ood_distance is not None:
        qc_section.update({"ood_distance": qc.ood_distance, "ood_threshold": qc.ood_threshold,
                           "out_of_distribution": qc.out_of_distribution,
                           "flagged_by": list(qc.flagged_by), "withheld": qc.withheld})
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "status": str(report.status), "reason": report.reason,
        "study": report.study, "created": report.created, "input": section,
        "pipeline": pipeline, "prediction": prediction, "saliency": saliency, "qc": qc_section,
        "timings": {k: round(v, 4) for k, v in report.timings.items()},
        "software": dict(report.software), "run": dict(report.run)}
    if report.replaces is not None:
        document["replaces"] = dict(report.replaces)
    if files.get("dicom"):
        document["dicom"] = [dict(d) for d in files["dicom"]]
    validate_report(document)
    return document


def detections(report: StudyReport) -> list[dict[str, Any]]:
    """Each detected box: class, score, corners in pixels (``[x1, y1, x2, y2]`` at pixel
    edges: x along a row, y down the rows) and in world millimetres (RAS+, the two corners)."""
    import numpy as np

    pred = report.prediction
    if pred is None or pred.boxes is None:
        return []
    affine = np.asarray(report.volume.affine) if report.volume is not None else None
    out = []
    for box, label, score in zip(np.asarray(pred.boxes), np.asarray(pred.box_labels),
                                 np.asarray(pred.box_scores), strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        item: dict[str, Any] = {"class": pred.classes[int(label)], "score": round(float(score), 4),
                                "box_px": [round(v, 2) for v in (x1, y1, x2, y2)]}
        if affine is not None:
            corners = [affine @ np.array([x - 0.5, y - 0.5, 0.0, 1.0])
                       for x, y in ((x1, y1), (x2, y2))]
            item["box_mm"] = [[round(float(v), 3) for v in c[:3]] for c in corners]
        out.append(item)
    return out


def render_json(report: StudyReport) -> str:
    """``report.json``'s text."""
    return json.dumps(to_document(report), indent=2)


def prediction_values(prediction: Any) -> dict[str, Any]:
    """A prediction's label, probabilities by class, counts and volumes (what
    :func:`finding_sentence` reads)."""
    values: dict[str, Any] = {"label": prediction.label}
    if prediction.probabilities is not None:
        values["probabilities"] = dict(zip(prediction.classes, prediction.probabilities,
                                           strict=True))
    if prediction.boxes is not None:
        values["counts"] = dict(prediction.counts)
    if prediction.mask is not None or prediction.volumes_ml:
        values["volumes_ml"] = dict(prediction.volumes_ml)
    return values


def _listed(parts: list[str], joint: str = "and") -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} {joint} {parts[-1]}"


def finding_sentence(prediction: dict[str, Any], names: Mapping[str, str]) -> str:
    """The result as a sentence a reader understands: ``PNEUMONIA (probability 0.98).``,
    ``Segmented anterior hippocampus (2.31 mL) and posterior hippocampus (1.85 mL), 4.16 mL
    in all.``, ``Detected 12 RBC, 1 WBC and no Platelets.``"""
    def name(c: str) -> str:
        return names.get(c, c)

    if "counts" in prediction:
        counts = prediction["counts"]
        if not any(counts.values()):
            return f"Nothing detected (no {_listed([name(c) for c in counts], 'or')})."
        return "Detected " + _listed([f"{n} {name(c)}" if n else f"no {name(c)}"
                                      for c, n in counts.items()]) + "."
    if "volumes_ml" in prediction:
        volumes = prediction["volumes_ml"]
        found = [(c, v) for c, v in volumes.items() if v > 0]
        if not found:
            return f"Nothing segmented: no {_listed([name(c) for c in volumes], 'or')} found."
        text = "Segmented " + _listed([f"{name(c)} ({v:.2f} mL)" for c, v in found])
        if len(found) > 1:
            text += f", {sum(v for _, v in found):.2f} mL in all"
        return text + "."
    probabilities = prediction.get("probabilities") or {}
    label = str(prediction.get("label", ""))
    if label in probabilities:
        return f"{name(label)} (probability {probabilities[label]:.2f})."
    return f"{name(label)}."
