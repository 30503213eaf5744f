"""Analyze a batch: for every study, predict, explain, and write a report folder.

``OUT/<study>/`` gets ``report.json`` (schema in ``medvision/report/report.schema.json``),
``report.html``, ``saliency.nii.gz`` (and ``mask.nii.gz`` for segmentation) in exactly the
input's geometry, and PNG figures. ``OUT/summary.csv`` and ``OUT/summary.html`` list the batch.
Bad input never stops the batch: the study is ``rejected`` (unreadable or unsuitable input) or
``failed`` (an error while processing) with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision import __version__
from medvision.analyze.studies import Study, choose_series, collect_studies
from medvision.audit.records import Auditor, AuditRecord, file_sha256
from medvision.config import config_hash
from medvision.errors import AuditError, DataError, MedvisionError
from medvision.explain import deletion_curve, explain
from medvision.explain.saliency import explained_model
from medvision.infer import Predictor
from medvision.infer.qc import QCFlag, check_input
from medvision.io import SourceEntry, Volume, write_volume
from medvision.report import SCHEMA_VERSION, validate_report
from medvision.report.html_report import study_html, summary_html
from medvision.report.images import key_images
from medvision.report.model_card import card_sections

__all__ = ["AnalyzeOptions", "StudyResult", "analyze"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeOptions:
    """Choices for one batch run."""

    explain_method: str | None = None
    faithfulness: bool = False
    include_phi: bool = False
    force: bool = False
    progress: bool | None = None


@dataclass(frozen=True)
class StudyResult:
    """The outcome of one study."""

    study: str
    status: str
    reason: str | None
    label: str
    score: str
    qc: str
    folder: Path
    skipped: bool = False


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
            "temperature": predictor.temperature}


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
    _atomic_write(folder / "report.html", study_html(report, images, card_sections(predictor.folder)))
    _atomic_write(folder / "report.json", json.dumps(report, indent=2))
    return report


def _summary_row(report: dict[str, Any]) -> dict[str, Any]:
    pred = report.get("prediction") or {}
    score = ""
    if pred.get("probabilities"):
        score = f"P={max(pred['probabilities'].values()):.3f}"
    elif pred.get("volumes_ml"):
        score = "; ".join(f"{k} {v:.2f} mL" for k, v in pred["volumes_ml"].items())
    qc = report.get("qc") or {}
    notes = [f["code"] for f in qc.get("flags", []) if f["severity"] == "warn"]
    if qc.get("out_of_distribution"):
        notes.append("out_of_distribution")
    return {"study": report["study"], "status": report["status"],
            "label": pred.get("label", ""), "score": score, "qc": ",".join(notes),
            "reason": report.get("reason") or ""}


def _input_digest(study: Study, entry: SourceEntry | None,
                  auditor: Auditor) -> tuple[str | None, str, dict[str, Any]]:
    """Pseudonymous patient and study keys, and input hashes (instance UIDs, pixels, files)."""
    pseudonym = auditor.pseudonymizer.pseudonym
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


def _audit(auditor: Auditor, study: Study, entry: SourceEntry | None, report: dict[str, Any],
           staging: Path, key: str) -> None:
    patient, study_key, inputs = _input_digest(study, entry, auditor)
    outputs = tuple({"path": f"{key}/{o['path']}", "sha256": o["sha256"]}
                    for o in Auditor.outputs(staging.iterdir(), relative_to=staging))
    prediction = report.get("prediction") or {}
    auditor.record(AuditRecord(
        action="analyze", status=report["status"], actor=auditor.actor,
        reason=report.get("reason"), patient_key=patient,
        study_key=study_key, inputs=inputs,
        pipeline=report["pipeline"], software=report["software"], outputs=outputs,
        result={"label": prediction.get("label"), "positive": _positive(prediction),
                "probabilities": prediction.get("probabilities"),
                "volumes_ml": prediction.get("volumes_ml"),
                "out_of_distribution": (report.get("qc") or {}).get("out_of_distribution"),
                "study": key},
        durations=report["timings"]))


def _positive(prediction: dict[str, Any]) -> bool | None:
    """Whether a prediction is a finding: not the first class, or any foreground volume."""
    if not prediction:
        return None
    if prediction.get("probabilities"):
        return bool(prediction["label"] != next(iter(prediction["probabilities"])))
    return any(v > 0 for v in (prediction.get("volumes_ml") or {}).values())


def _publish(staging: Path, folder: Path) -> None:
    """Move a finished study folder into place (replacing an older one)."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        os.replace(staging, folder)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, folder)


def analyze(inputs: Iterable[str | os.PathLike[str]], predictor: Predictor,
            out_dir: str | os.PathLike[str], *, auditor: Auditor,
            options: AnalyzeOptions = AnalyzeOptions()) -> list[StudyResult]:
    """Analyze every study under ``inputs``; returns one result per study.

    Each study's outputs are written to a staging folder, its audit record is appended, and
    only then is the folder moved into place: no result exists without its record. Studies
    whose ``report.json`` already exists are skipped unless ``options.force``.

    Raises:
        AuditError: a record could not be written; the batch stops there.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = collect_studies(inputs, pseudonymizer=auditor.pseudonymizer)
    show = sys.stderr.isatty() if options.progress is None else options.progress
    results, rows = [], []
    for study in tqdm(studies, desc="studies", disable=not show, unit="study"):
        folder = out / study.key
        existing = folder / "report.json"
        if existing.is_file() and not options.force:
            report = json.loads(existing.read_text())
            skipped = True
        else:
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
                body, images = {"status": "failed",
                                "reason": f"internal error: {type(e).__name__}: {e}"}, []
            report = _finish(study, predictor, staging, body, images, timings, started)
            try:
                _audit(auditor, study, entry, report, staging, study.key)
            except AuditError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _publish(staging, folder)
            skipped = False
        row = _summary_row(report)
        rows.append(row)
        results.append(StudyResult(study=study.key, status=row["status"], reason=row["reason"] or None,
                                   label=row["label"], score=row["score"], qc=row["qc"],
                                   folder=folder, skipped=skipped))
        log.info("%s: %s %s", study.key, row["status"], row["label"])
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study", "status", "label", "score", "qc",
                                                    "reason"])
        writer.writeheader()
        writer.writerows(rows)
    _atomic_write(out / "summary.html", summary_html(rows, predictor.pipeline.name))
    return results
