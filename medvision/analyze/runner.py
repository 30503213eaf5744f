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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision._version import __version__
from medvision.analyze.studies import Study, choose_series
from medvision.atomic import write_text_atomic
from medvision.audit.records import Pseudonymizer
from medvision.config import config_hash
from medvision.errors import DataError, InvalidDicomError, MedvisionError
from medvision.explain import deletion_curve, explain
from medvision.explain.saliency import explained_model
from medvision.hashing import file_sha256
from medvision.infer import Predictor
from medvision.infer.qc import QCFlag, check_input
from medvision.io import SourceEntry, Volume, write_volume
from medvision.io.boundary import reading
from medvision.report import SCHEMA_VERSION, validate_report
from medvision.report.html_report import study_html
from medvision.report.images import key_images
from medvision.report.model_card import card_sections

__all__ = ["AnalyzeOptions", "StudyOutcome", "run_study"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeOptions:
    """Choices for one batch run.

    Attributes:
        explain_method: saliency method (``None``: the pipeline's).
        faithfulness: also compute a deletion-curve score.
        include_phi: write patient name, ID and birth date into report.json.
        force: re-run studies even when their report matches this run.
        overwrite: re-run a study whose existing report was made differently (other
            pipeline, weights, options or inputs); ``False`` reports it as a ``conflict``.
        progress: show a progress bar (``None``: when stderr is a terminal).
    """

    explain_method: str | None = None
    faithfulness: bool = False
    include_phi: bool = False
    force: bool = False
    overwrite: bool = True
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


def input_signature(paths: Sequence[str]) -> str:
    """SHA-256 over the input files' names, sizes and modification times (no content read).

    A study whose files were replaced, added or removed gets another signature, so its old
    report is not reused.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            info = Path(path).stat()
            digest.update(f"{Path(path).name}\x1f{info.st_size}\x1f{info.st_mtime_ns}\x1e".encode())
        except OSError:
            digest.update(f"{Path(path).name}\x1fmissing\x1e".encode())
    return digest.hexdigest()


def run_fingerprint(predictor: Predictor, options: AnalyzeOptions,
                    study: Study) -> dict[str, Any]:
    """What decides a study's outputs; a study is skipped only when its report has the same.

    Pipeline name, version, weights SHA-256, config hash, backend, explanation method, the
    options that change outputs, the report schema and the input files' signature.
    """
    pipeline = predictor.pipeline
    return {"pipeline": pipeline.name, "version": pipeline.version,
            "weights_sha256": predictor.weights_sha256, "config_hash": config_hash(pipeline),
            "backend": predictor.backend_name,
            "explain_method": options.explain_method or pipeline.explanation.method,
            "faithfulness": options.faithfulness, "include_phi": options.include_phi,
            "schema_version": SCHEMA_VERSION, "input_sha256": input_signature(study.paths)}


def _input_section(study: Study, entry: SourceEntry | None, volume: Volume | None) -> dict[str, Any]:
    section: dict[str, Any] = {"study_key": study.key, "source_name": study.source_name,
                               "format": entry.format if entry else "unknown",
                               "modality": volume.modality if volume else None,
                               "series_key_sha256": None, "instance_uid_sha256": [],
                               "geometry": None}
    if entry is not None and entry.series is not None:
        section["series_key_sha256"] = _sha(entry.series.key)
    unreadable = list(volume.skipped_files) if volume is not None else []
    unreadable += [(p, r) for p, r, _ in study.unreadable if (p, r) not in unreadable]
    if unreadable:
        section["unreadable_files"] = [{"file": Path(path).name, "reason": reason}
                                       for path, reason in unreadable]
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
            volume = entry.load(skip_unreadable=True)
        except DataError as e:
            raise _Rejected(str(e)) from e
        if entry.series is not None:  # files of this series left out when it was assembled
            uid = str(entry.series.header.get("SeriesInstanceUID") or "")
            same = tuple((p, r) for p, r, s in study.unreadable if s == uid)
            if same:
                volume = replace(volume, skipped_files=(*same, *volume.skipped_files))
        timings["load_s"] = time.perf_counter() - t0
        report["input"] = _input_section(study, entry, volume)
        if options.include_phi and entry.series is not None:
            report["input"]["phi"] = _phi(entry.series.frames[0].dataset)
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
    ood = None
    if prediction.ood_distance is not None and prediction.ood_threshold is not None:
        ood = prediction.ood_distance > prediction.ood_threshold
    flagged_by = [f.code for f in flags
                  if f.severity == "warn" and f.code in pipeline.qc.result_relevant]
    if ood:
        flagged_by.insert(0, "out_of_distribution")
    flagged_by = list(dict.fromkeys(flagged_by))
    withheld = bool(ood) and pipeline.qc.on_out_of_distribution == "abstain"
    qc = {"flags": [f.as_dict() for f in flags], "ood_distance": prediction.ood_distance,
          "ood_threshold": prediction.ood_threshold, "out_of_distribution": ood,
          "flagged_by": flagged_by, "withheld": withheld}
    status, reason = ("flagged", _flag_reason(flagged_by, qc, withheld)) if flagged_by \
        else ("ok", None)
    if withheld:
        # The label, probabilities, mask and saliency (which shows what drove the label)
        # are all withheld; only the reason and the input's QC are reported.
        report.update({"status": status, "reason": reason, "prediction": None,
                       "saliency": None, "qc": qc})
        return report, [], entry

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
    report.update({
        "status": status, "reason": reason, "prediction": pred,
        "saliency": {"method": saliency.method, "params": dict(saliency.params),
                     "target": saliency.target,
                     "files": {"nifti": "saliency.nii.gz",
                               "png": [p.name for p in images if p.name.startswith("overlay")]},
                     "faithfulness": faith},
        "qc": qc,
    })
    timings["figures_s"] = time.perf_counter() - t0
    return report, [p.name for p in images], entry


def _phi(ds: Any) -> dict[str, str]:
    """Name, ID and birth date (``--include-phi``); a malformed value is left empty."""
    out = {}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        try:
            out[keyword] = str(ds.get(keyword, ""))
        except Exception:  # noqa: BLE001 - malformed identity values are not an error here
            out[keyword] = ""
    return out


def _flag_reason(codes: Sequence[str], qc: dict[str, Any], withheld: bool) -> str:
    """One sentence on why a result may not apply."""
    parts = []
    for code in codes:
        if code == "out_of_distribution":
            parts.append(f"the input is out of distribution (feature distance "
                         f"{qc['ood_distance']:.1f} > threshold {qc['ood_threshold']:.1f})")
        else:
            messages = [f["message"] for f in qc["flags"] if f["code"] == code]
            parts.append(f"{code}: {messages[0]}" if messages else code)
    tail = ("; the result is withheld" if withheld
            else "; the result may not apply to this input")
    return "; ".join(parts) + tail


def _finish(study: Study, predictor: Predictor, folder: Path, body: dict[str, Any],
            images: list[str], timings: dict[str, float], started: float,
            run: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    timings["total_s"] = time.perf_counter() - started
    report = {
        "schema_version": SCHEMA_VERSION, "status": body["status"], "reason": body.get("reason"),
        "study": study.key, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": body.get("input") or _input_section(study, None, None),
        "pipeline": _pipeline_section(predictor), "prediction": body.get("prediction"),
        "saliency": body.get("saliency"), "qc": body.get("qc") or {"flags": []},
        "timings": {k: round(v, 4) for k, v in timings.items()}, "software": _software(),
        "run": run,
    }
    if previous is not None:
        report["replaces"] = replaced_summary(previous, run)
    validate_report(report)
    write_text_atomic(folder / "report.html", study_html(report, images, card_sections(predictor.folder)))
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2))
    return report


def replaced_summary(previous: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What an older report of the same study was, and what differs from this run."""
    old_run = previous.get("run") or {}
    changed = sorted(k for k in run if old_run.get(k) != run[k]) if old_run else ["run"]
    return {"created": str(previous.get("created", "")), "status": str(previous.get("status", "")),
            "pipeline": f"{(previous.get('pipeline') or {}).get('name', '')} "
                        f"{(previous.get('pipeline') or {}).get('version', '')}".strip(),
            "changed": changed}


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
            with reading(frame.path, "pixel data", InvalidDicomError):
                pixels = (hashlib.sha256(bytes(ds.PixelData)).hexdigest()
                          if "PixelData" in ds else None)
        except DataError:
            pixels = None  # unreadable pixel data: left out of the volume and reported
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
              pseudonymizer: Pseudonymizer, *,
              previous: dict[str, Any] | None = None) -> StudyOutcome:
    """Process one study into ``out/.<key>.partial``; never raises for a bad study.

    A study that cannot be read is ``rejected``; an error while processing makes it
    ``failed``; either way it gets a report. ``previous`` is the report this one replaces
    (summarised in its ``replaces`` section).
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
    run = run_fingerprint(predictor, options, study)
    report = _finish(study, predictor, staging, body, images, timings, started, run, previous)
    try:
        with reading(study.key, "identifiers for the audit record", InvalidDicomError):
            patient, study_key, inputs = _input_digest(study, entry, pseudonymizer)
    except DataError as e:  # a file changed or vanished, or a malformed identifier
        log.warning("study %s: cannot hash its inputs (%s)", study.key, e)
        patient, study_key = None, pseudonymizer.pseudonym("study", study.key)
        inputs = {"source_name": study.source_name, "error": str(e)}
    return StudyOutcome(study=study.key, report=report, staging=staging, patient_key=patient,
                        study_key=study_key, inputs=inputs)
