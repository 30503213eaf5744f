"""Analyze one study: predict, explain, and write its report folder (staged).

``OUT/<study>/`` gets ``report.json`` (schema in ``medvision/report/report.schema.json``),
``report.html``, ``saliency.nii.gz`` (and ``mask.nii.gz`` for segmentation) in exactly the
input's geometry, and PNG figures. ``OUT/summary.csv`` and ``OUT/summary.html`` list the batch.
Bad input never stops the batch: the study is ``rejected`` (unreadable or unsuitable input) or
``failed`` (an error while processing) with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision import __version__
from medvision.analyze.studies import Study, choose_series
from medvision.atomic import write_text_atomic
from medvision.audit.records import Pseudonymizer
from medvision.config import config_hash
from medvision.errors import DataError, MedvisionError
from medvision.explain import deletion_curve, explain
from medvision.explain.saliency import explained_model
from medvision.hashing import file_sha256
from medvision.infer import Predictor
from medvision.infer.qc import QCFlag, check_input
from medvision.io import SourceEntry, Volume, write_volume
from medvision.report import SCHEMA_VERSION, validate_report
from medvision.report.html_report import study_html
from medvision.report.images import key_images
from medvision.report.model_card import card_sections

__all__ = ["AnalyzeOptions", "StudyOutcome", "run_study"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeOptions:
    """Choices for one batch run."""

    explain_method: str | None = None
    faithfulness: bool = False
    include_phi: bool = False
    force: bool = False
    progress: bool | None = None


class _Rejected(Exception):
    def __init__(self, reason: str, flags: Sequence[QCFlag] = ()) -> None:
        super().__init__(reason)
        self.flags = list(flags)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _software() -> dict[str, str]:
    import captum
    import monai
    import numpy
    import pydicom
    import torch

    return {"medvision": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "captum": captum.__version__, "pydicom": pydicom.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0]}


def _input_section(study: Study, entry: SourceEntry | None, volume: Volume | None) -> dict[str, Any]:
    section: dict[str, Any] = {"study_key": study.key, "source_name": study.source_name,
                               "format": entry.format if entry else "unknown",
                               "modality": volume.modality if volume else None,
                               "series_key_sha256": None, "instance_uid_sha256": [],
                               "geometry": None}
    if entry is not None and entry.series is not None:
        section["series_key_sha256"] = _sha(entry.series.key)
    if volume is not None:
        section["instance_uid_sha256"] = [_sha(uid) for uid in volume.source_uids]
        section["geometry"] = {"shape": list(volume.spatial_shape),
                               "spacing_mm": [round(s, 6) for s in volume.spacing],
                               "orientation": volume.orientation,
                               "affine": [[round(float(v), 6) for v in row] for row in volume.affine]}
    return section


def _pipeline_section(predictor: Predictor) -> dict[str, Any]:
    pipeline = predictor.pipeline
    return {"name": pipeline.name, "version": pipeline.version, "task": pipeline.task,
            "weights_sha256": predictor.weights_sha256, "config_hash": config_hash(pipeline),
            "temperature": predictor.temperature, "backend": predictor.backend_name}


def _process(study: Study, predictor: Predictor, folder: Path, options: AnalyzeOptions,
             timings: dict[str, float]) -> tuple[dict[str, Any], list[str], SourceEntry | None]:
    """Analyze one study; returns the report body, image file names and the entry used."""
    pipeline = predictor.pipeline
    entry: SourceEntry | None = None
    volume: Volume | None = None
    report: dict[str, Any] = {"input": _input_section(study, None, None)}
    try:
        if study.reason:
            raise _Rejected(study.reason)
        entry, why = choose_series(study, pipeline)
        if entry is None:
            raise _Rejected(why)
        t0 = time.perf_counter()
        try:
            volume = entry.load()
        except DataError as e:
            raise _Rejected(str(e)) from e
        timings["load_s"] = time.perf_counter() - t0
        report["input"] = _input_section(study, entry, volume)
        if options.include_phi and entry.series is not None:
            ds = entry.series.frames[0].dataset
            report["input"]["phi"] = {k: str(ds.get(k, "")) for k in
                                      ("PatientName", "PatientID", "PatientBirthDate")}
        flags = check_input(volume, pipeline)
        rejects = [f for f in flags if f.severity == "reject"]
        if rejects:
            raise _Rejected("; ".join(f.message for f in rejects), flags)
    except _Rejected as e:
        if entry is None and study.candidates:
            report["input"] = _input_section(study, study.candidates[0], None)
        report["qc"] = {"flags": [f.as_dict() for f in e.flags]}
        report["status"], report["reason"] = "rejected", str(e)
        return report, [], entry or (study.candidates[0] if study.candidates else None)

    t0 = time.perf_counter()
    prepared = predictor.prepare(volume)
    prediction = predictor.predict(prepared)
    timings["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    saliency = explain(predictor, prepared, prediction, method=options.explain_method)
    faith = None
    if options.faithfulness:
        model, target, _ = explained_model(predictor, prediction)
        faith = deletion_curve(model, prepared.image, saliency.model_space, target=target)
    timings["explain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_volume(saliency.volume, folder / "saliency.nii.gz")
    pred: dict[str, Any] = {"label": prediction.label, "calibrated": predictor.temperature != 1.0}
    if prediction.probabilities is not None:
        pred["probabilities"] = dict(zip(prediction.classes, prediction.probabilities, strict=True))
        pred["threshold"] = prediction.threshold
    if prediction.mask is not None:
        write_volume(prediction.mask, folder / "mask.nii.gz")
        pred["mask_file"] = "mask.nii.gz"
        pred["volumes_ml"] = {k: round(v, 4) for k, v in prediction.volumes_ml.items()}
    images = key_images(volume, folder, saliency=saliency.volume, mask=prediction.mask,
                        classes=prediction.classes)
    ood = None
    if prediction.ood_distance is not None and prediction.ood_threshold is not None:
        ood = prediction.ood_distance > prediction.ood_threshold
    report.update({
        "status": "ok", "reason": None, "prediction": pred,
        "saliency": {"method": saliency.method, "params": dict(saliency.params),
                     "target": saliency.target,
                     "files": {"nifti": "saliency.nii.gz",
                               "png": [p.name for p in images if p.name.startswith("overlay")]},
                     "faithfulness": faith},
        "qc": {"flags": [f.as_dict() for f in flags], "ood_distance": prediction.ood_distance,
               "ood_threshold": prediction.ood_threshold, "out_of_distribution": ood},
    })
    timings["figures_s"] = time.perf_counter() - t0
    return report, [p.name for p in images], entry


def _finish(study: Study, predictor: Predictor, folder: Path, body: dict[str, Any],
            images: list[str], timings: dict[str, float], started: float) -> dict[str, Any]:
    timings["total_s"] = time.perf_counter() - started
    report = {
        "schema_version": SCHEMA_VERSION, "status": body["status"], "reason": body.get("reason"),
        "study": study.key, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": body.get("input") or _input_section(study, None, None),
        "pipeline": _pipeline_section(predictor), "prediction": body.get("prediction"),
        "saliency": body.get("saliency"), "qc": body.get("qc") or {"flags": []},
        "timings": {k: round(v, 4) for k, v in timings.items()}, "software": _software(),
    }
    validate_report(report)
    write_text_atomic(folder / "report.html", study_html(report, images, card_sections(predictor.folder)))
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2))
    return report


def _input_digest(study: Study, entry: SourceEntry | None,
                  pseudonymizer: Pseudonymizer) -> tuple[str | None, str, dict[str, Any]]:
    """Pseudonymous patient and study keys, and input hashes (instance UIDs, pixels, files)."""
    pseudonym = pseudonymizer.pseudonym
    if entry is None or entry.series is None:
        path = entry.source if entry is not None else (
            study.reason.split(":", 1)[0] if study.reason else "")
        digest: dict[str, Any] = {"source_name": study.source_name}
        if path and Path(path).is_file():
            digest["file_sha256"] = file_sha256(path)
        return None, pseudonym("file", digest.get("file_sha256", study.key)), digest
    instances, patient = [], None
    seen: set[str] = set()
    for frame in entry.series.frames:
        if frame.path in seen:
            continue
        seen.add(frame.path)
        ds = frame.dataset
        patient = patient or (str(ds.get("PatientID")) if ds.get("PatientID") else None)
        try:
            pixels = hashlib.sha256(bytes(ds.PixelData)).hexdigest() if "PixelData" in ds else None
        except (OSError, ValueError, AttributeError):
            pixels = None  # unreadable pixel data: the study is rejected for it anyway
        instances.append({"sop_instance_uid_sha256": _sha(frame.sop_instance_uid),
                          "pixel_data_sha256": pixels})
    study_uid = str(entry.series.header.get("StudyInstanceUID") or entry.series.key)
    return (pseudonym("patient", patient) if patient else None, pseudonym("study", study_uid),
            {"series_key_sha256": _sha(entry.series.key), "instances": instances})


@dataclass(frozen=True)
class StudyOutcome:
    """One processed study, staged and ready to be audited and published.

    Attributes:
        study: the study key (its folder name).
        report: the validated report.
        staging: the folder holding its outputs until they are published.
        patient_key: keyed pseudonym of the Patient ID, when there is one.
        study_key: keyed pseudonym of the Study Instance UID (or of the file's hash).
        inputs: input hashes for the audit record.
    """

    study: str
    report: dict[str, Any]
    staging: Path
    patient_key: str | None
    study_key: str
    inputs: dict[str, Any]


def run_study(study: Study, predictor: Predictor, out: Path, options: AnalyzeOptions,
              pseudonymizer: Pseudonymizer) -> StudyOutcome:
    """Process one study into ``out/.<key>.partial``; never raises for a bad study.

    A study that cannot be read is ``rejected``; an error while processing makes it
    ``failed``; either way it gets a report.
    """
    staging = out / f".{study.key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    entry = None
    try:
        body, images, entry = _process(study, predictor, staging, options, timings)
    except DataError as e:
        body, images = {"status": "rejected", "reason": str(e)}, []
    except MedvisionError as e:
        body, images = {"status": "failed", "reason": str(e)}, []
    except Exception as e:  # noqa: BLE001 - one study must not end the batch
        log.exception("study %s failed", study.key)
        body, images = {"status": "failed", "reason": f"internal error: {type(e).__name__}: {e}"}, []
    report = _finish(study, predictor, staging, body, images, timings, started)
    patient, study_key, inputs = _input_digest(study, entry, pseudonymizer)
    return StudyOutcome(study=study.key, report=report, staging=staging, patient_key=patient,
                        study_key=study_key, inputs=inputs)
