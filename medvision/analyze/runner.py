"""Analyze one study: predict, explain, and write its report folder (staged).

``OUT/<study>/`` gets ``report.json`` (schema in ``medvision/report/report.schema.json``),
``report.html``, ``saliency.nii.gz`` (and ``mask.nii.gz`` with its label sidecars for
segmentation) in exactly the input's geometry, PNG figures, and with ``dicom`` the DICOM
results in ``dicom/``. The stages build a typed :class:`StudyReport`; the renderers in
:mod:`medvision.report` write every file from it. ``OUT/summary.csv`` and ``OUT/summary.html`` list the batch.
Bad input never stops the batch: the study is ``rejected`` (unreadable or unsuitable input) or
``failed`` (an error while processing) with the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision.analyze.studies import Study, choose_series
from medvision.atomic import write_text_atomic
from medvision.audit.records import Pseudonymizer
from medvision.config import config_hash
from medvision.errors import DataError, InvalidDicomError, MedvisionError
from medvision.explain import deletion_curve, explain
from medvision.explain.saliency import (
    SaliencyMap,
    ensemble_network,
    explain_batch,
    explained_model,
    gradcam_layer,
)
from medvision.hashing import file_sha256
from medvision.infer import LazyPredictor, Predictor
from medvision.infer.predictor import Prediction, Prepared, prepare_volume
from medvision.infer.qc import QCFlag, check_input
from medvision.io import SourceEntry, Volume, write_volume
from medvision.io.boundary import reading
from medvision.io.volume import reduce_volumes
from medvision.provenance import software_versions
from medvision.report.dicom import write_dicom
from medvision.report.figures import KeyImage, key_images
from medvision.report.html import render_study
from medvision.report.json import SCHEMA_VERSION, to_document
from medvision.report.labels import write_label_sidecars
from medvision.report.study import (
    Geometry,
    InputSummary,
    PipelineInfo,
    QCResult,
    StudyReport,
    UnreadableFile,
    class_words,
)
from medvision.vocabulary import Severity, Status

__all__ = ["AnalyzeOptions", "StudyOutcome", "run_study"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeOptions:
    """Choices for one batch run.

    Attributes:
        explain_method: saliency method (``None``: the pipeline's).
        explain_layer: GradCAM/LayerCAM layer (``None``: the pipeline's).
        faithfulness: also compute a deletion-curve score.
        include_phi: write patient name, ID and birth date into report.json.
        force: re-run studies even when their report matches this run.
        overwrite: re-run a study whose existing report was made differently (other
            pipeline, weights, options or inputs); ``False`` reports it as a ``conflict``.
        progress: show a progress bar (``None``: when stderr is a terminal).
        dicom: also write the DICOM results (SR; SEG and Parametric Map for series) of
            DICOM inputs into ``<study>/dicom/``.
        fhir: also write ``fhir.json``: a FHIR R4 Bundle (DiagnosticReport, Observations,
            ImagingStudy, Device) with a pseudonymous subject.
        batch_size: studies per forward (and saliency) pass.
        workers: reader processes preparing studies ahead of the network (None: up to 4,
            one per core; 0: read in this process).
        device: where Dask workers run the networks (``--scheduler``); a local run uses
            the predictor's own device.
    """

    explain_method: str | None = None
    explain_layer: str | None = None
    faithfulness: bool = False
    include_phi: bool = False
    force: bool = False
    overwrite: bool = True
    progress: bool | None = None
    dicom: bool = False
    fhir: bool = False
    batch_size: int = 8
    workers: int | None = None
    device: str = "cpu"


class _Rejected(Exception):
    def __init__(self, reason: str, flags: Sequence[QCFlag] = ()) -> None:
        super().__init__(reason)
        self.flags = tuple(flags)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def run_fingerprint(predictor: Predictor | LazyPredictor, options: AnalyzeOptions,
                    study: Study) -> dict[str, Any]:
    """What decides a study's outputs; a study is skipped only when its report has the same.

    Pipeline name, version, weights SHA-256, config hash, backend, explanation method, the
    options that change outputs, the report schema and the input files' signature.
    """
    pipeline = predictor.pipeline
    run = {"pipeline": pipeline.name, "version": pipeline.version,
           "weights_sha256": predictor.weights_sha256, "config_hash": config_hash(pipeline),
           "backend": predictor.backend_name,
           "explain_method": str(options.explain_method or pipeline.explanation.method),
           "faithfulness": options.faithfulness, "include_phi": options.include_phi,
           "schema_version": SCHEMA_VERSION, "input_sha256": input_signature(study.paths)}
    if options.explain_layer:
        run["explain_layer"] = options.explain_layer
    if predictor.precision != "float32":  # float32 runs keep the reports made before it
        run["precision"] = predictor.precision
    if options.dicom:
        run["dicom"] = True
    if options.fhir:
        run["fhir"] = True
    return run


def _input_summary(study: Study, entry: SourceEntry | None, volume: Volume | None,
                   phi: dict[str, str] | None = None) -> InputSummary:
    unreadable = list(volume.skipped_files) if volume is not None else []
    unreadable += [(p, r) for p, r, _ in study.unreadable if (p, r) not in unreadable]
    return InputSummary(
        study_key=study.key, source_name=study.source_name,
        format=entry.format if entry else "unknown",
        modality=volume.modality if volume else None,
        series_key_sha256=_sha(entry.series.key) if entry is not None and entry.series else None,
        instance_uid_sha256=tuple(_sha(uid) for uid in volume.source_uids) if volume else (),
        geometry=Geometry.of(volume) if volume is not None else None,
        unreadable_files=tuple(UnreadableFile(Path(path).name, reason)
                               for path, reason in unreadable),
        phi=phi, synthetic=volume.header.get("synthetic") if volume is not None else None)


def pipeline_info(predictor: Predictor) -> PipelineInfo:
    """The provenance of a predictor, as reports and audit records name it."""
    pipeline = predictor.pipeline
    codes = {c: label.code for c, label in pipeline.report.classes.items()}
    names = {c: class_words(c, code.meaning if (code := codes.get(c)) else None)
             for c in pipeline.classes}
    return PipelineInfo(name=pipeline.name, version=pipeline.version, task=str(pipeline.task),
                        class_names={k: v for k, v in names.items() if v != k},
                        weights_sha256=predictor.weights_sha256,
                        config_hash=config_hash(pipeline), temperature=predictor.temperature,
                        backend=predictor.backend_name,
                        device={**predictor.device_info.as_dict(),
                                "precision": predictor.precision}, members=tuple(
                            {"weights": m.weights.name, "weights_sha256": m.weights_sha256,
                             "network": (m.model or pipeline.model).name,
                             "temperature": m.temperature,
                             **({"fold": m.fold} if m.fold is not None else {}),
                             **({"member": m.member} if m.member is not None else {})}
                            for m in predictor.bundle.members))


def _sources(entry: SourceEntry, volume: Volume) -> tuple[Any, ...]:
    """The series' datasets the volume was built from, once each, in slice order."""
    if entry.series is None:
        return ()
    left_out = {path for path, _ in volume.skipped_files}
    seen: dict[str, Any] = {}
    for frame in entry.series.frames:
        if frame.path not in left_out and frame.path not in seen:
            seen[frame.path] = frame.dataset
    return tuple(seen.values())


@dataclass
class _Draft:
    """A report being assembled (mutable until frozen into a StudyReport)."""

    status: Status
    reason: str | None
    input: InputSummary
    prediction: Prediction | None = None
    saliency: SaliencyMap | None = None
    faithfulness: dict[str, Any] | None = None
    qc: QCResult = QCResult()
    volume: Volume | None = None
    sources: tuple[Any, ...] = ()
    entry: SourceEntry | None = None


@dataclass(eq=False)
class StudyInput:
    """A study read and preprocessed, ready for the network (made in a reader process; no
    network needed): or its rejection, or the error that stopped it."""

    study: Study
    timings: dict[str, float]
    rejected: _Draft | None = None
    error: BaseException | None = None
    prepared: Prepared | None = None
    volume: Volume | None = None
    entry: SourceEntry | None = None
    summary: InputSummary | None = None
    flags: tuple[QCFlag, ...] = ()


def read_study(study: Study, pipeline: Any, options: AnalyzeOptions) -> StudyInput:
    """Read, check and preprocess one study (the part of an analysis before the network);
    never raises for a bad study."""
    timings: dict[str, float] = {}
    entry: SourceEntry | None = None
    volume: Volume | None = None
    try:
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
            if entry.series is not None:  # files of this series left out when assembled
                uid = str(entry.series.header.get("SeriesInstanceUID") or "")
                same = tuple((p, r) for p, r, s in study.unreadable if s == uid)
                if same:
                    volume = replace(volume, skipped_files=(*same, *volume.skipped_files))
            timings["load_s"] = time.perf_counter() - t0
            try:
                volume = reduce_volumes(volume, pipeline.input.four_d,
                                        b_value=pipeline.input.b_value,
                                        channels=pipeline.in_channels)
            except DataError as e:
                raise _Rejected(str(e)) from e
            phi = (_phi(entry.series.frames[0].dataset)
                   if options.include_phi and entry.series is not None else None)
            summary = _input_summary(study, entry, volume, phi)
            flags = check_input(volume, pipeline)
            rejects = [f for f in flags if f.severity == Severity.REJECT]
            if rejects:
                raise _Rejected("; ".join(f.message for f in rejects), flags)
        except _Rejected as e:
            chosen = entry or (study.candidates[0] if study.candidates else None)
            return StudyInput(study=study, timings=timings, rejected=_Draft(
                status=Status.REJECTED, reason=str(e),
                input=_input_summary(study, chosen, volume), qc=QCResult(flags=e.flags),
                entry=chosen))
        t0 = time.perf_counter()
        prepared = prepare_volume(pipeline, volume)
        timings["prepare_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - one study must not end the batch
        return StudyInput(study=study, timings=timings, error=e, volume=volume, entry=entry)
    return StudyInput(study=study, timings=timings, prepared=prepared, volume=volume,
                      entry=entry, summary=summary, flags=tuple(flags))


def _judged(item: StudyInput, prediction: Prediction, pipeline: Any) -> _Draft:
    """The draft of a predicted study: QC (out of distribution, result-relevant flags) and
    status; the prediction itself is left out when it is withheld."""
    ood = None
    if prediction.ood_distance is not None and prediction.ood_threshold is not None:
        ood = prediction.ood_distance > prediction.ood_threshold
    flagged_by = [f.code for f in item.flags
                  if f.severity == Severity.WARN and f.code in pipeline.qc.result_relevant]
    if ood:
        flagged_by.insert(0, "out_of_distribution")
    withheld = bool(ood) and pipeline.qc.on_out_of_distribution == "abstain"
    qc = QCResult(flags=item.flags, ood_distance=prediction.ood_distance,
                  ood_threshold=prediction.ood_threshold, out_of_distribution=ood,
                  flagged_by=tuple(dict.fromkeys(flagged_by)), withheld=withheld)
    status, reason = ((Status.FLAGGED, _flag_reason(qc)) if qc.flagged_by
                      else (Status.OK, None))
    assert item.summary is not None and item.volume is not None and item.entry is not None
    draft = _Draft(status=status, reason=reason, input=item.summary, qc=qc,
                   volume=item.volume, sources=_sources(item.entry, item.volume),
                   entry=item.entry)
    if not withheld:
        # the label, probabilities, mask and saliency (which shows what drove the label)
        # are all withheld for an abstention; only the reason and the input's QC remain
        draft.prediction = prediction
    return draft


def _shared(timings: Sequence[dict[str, float]], key: str, seconds: float) -> None:
    for t in timings:  # a batch's time, shared among its studies
        t[key] = t.get(key, 0.0) + seconds / max(len(timings), 1)


def analyse_inputs(items: Sequence[StudyInput], predictor: Predictor,
                   options: AnalyzeOptions) -> list[_Draft | BaseException]:
    """The network part of an analysis for several read studies at once: predictions in
    batches, then saliency in batches (where the method allows); a study whose batch fails
    is retried alone, so one bad study fails only itself. Returns one draft (or the error
    that failed the study) per item."""
    pipeline = predictor.pipeline
    out: list[_Draft | BaseException | None] = [
        i.rejected if i.rejected is not None else i.error for i in items]
    ready = [k for k, i in enumerate(items) if i.prepared is not None and out[k] is None]
    t0 = time.perf_counter()
    predictions: dict[int, Prediction] = {}
    try:
        found = predictor.predict_batch([items[k].prepared for k in ready],  # type: ignore[misc]
                                        capture=gradcam_layer(predictor, options.explain_method,
                                                              options.explain_layer))
        predictions = dict(zip(ready, found, strict=True))
    except Exception:  # noqa: BLE001 - retried one by one below
        for k in ready:
            try:
                predictions[k] = predictor.predict(items[k].prepared)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001
                out[k] = e
    _shared([items[k].timings for k in ready], "predict_s", time.perf_counter() - t0)
    drafts = {k: _judged(items[k], p, pipeline) for k, p in predictions.items()}
    explained = [k for k, d in drafts.items() if d.prediction is not None]
    prepared = {k: p for k in explained if (p := items[k].prepared) is not None}
    t0 = time.perf_counter()
    maps: dict[int, SaliencyMap] = {}
    try:
        found_maps = explain_batch(predictor, [prepared[k] for k in explained],
                                   [predictions[k] for k in explained],
                                   method=options.explain_method, layer=options.explain_layer)
        maps = dict(zip(explained, found_maps, strict=True))
    except Exception:  # noqa: BLE001 - retried one by one below
        for k in explained:
            try:
                maps[k] = explain(predictor, prepared[k], predictions[k],
                                  method=options.explain_method, layer=options.explain_layer)
            except Exception as e:  # noqa: BLE001
                out[k] = e
    for k, saliency in maps.items():
        drafts[k].saliency = saliency
        if options.faithfulness:
            model, target, _ = explained_model(predictor, predictions[k],
                                               network=ensemble_network(predictor))
            drafts[k].faithfulness = deletion_curve(
                model, prepared[k].image, saliency.model_space,
                target=target)
    _shared([items[k].timings for k in explained], "explain_s", time.perf_counter() - t0)
    for k, draft in drafts.items():
        if out[k] is None:
            out[k] = draft
    return [o if o is not None else RuntimeError("not analysed") for o in out]


def _process(study: Study, predictor: Predictor, options: AnalyzeOptions,
             timings: dict[str, float]) -> _Draft:
    """Analyze one study into a draft report (no files written): the batched path with a
    batch of one."""
    item = read_study(study, predictor.pipeline, options)
    result = analyse_inputs([item], predictor, options)[0]
    timings.update(item.timings)
    if isinstance(result, BaseException):
        raise result
    return result


def _phi(ds: Any) -> dict[str, str]:
    """Name, ID and birth date (``--include-phi``); a malformed value is left empty."""
    out = {}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        try:
            out[keyword] = str(ds.get(keyword, ""))
        except Exception:  # noqa: BLE001 - malformed identity values are not an error here
            out[keyword] = ""
    return out


def _flag_reason(qc: QCResult) -> str:
    """One sentence on why a result may not apply."""
    parts = []
    for code in qc.flagged_by:
        if code == "out_of_distribution":
            parts.append(f"the input is out of distribution (feature distance "
                         f"{qc.ood_distance:.1f} > threshold {qc.ood_threshold:.1f})")
        else:
            messages = [f.message for f in qc.flags if f.code == code]
            parts.append(f"{code}: {messages[0]}" if messages else code)
    tail = ("; the result is withheld" if qc.withheld
            else "; the result may not apply to this input")
    return "; ".join(parts) + tail


def _render(report: StudyReport, predictor: Predictor, folder: Path, options: AnalyzeOptions,
            predecessors: Sequence[Any], timings: dict[str, float]) -> StudyReport:
    """Write the study's files (NIfTI maps, figures, DICOM, page, report.json) from the
    in-memory report; returns the report with the files it names."""
    t0 = time.perf_counter()
    pipeline = predictor.pipeline
    files: dict[str, Any] = {}
    images: list[KeyImage] = []
    prediction = report.prediction
    if report.saliency is not None:
        write_volume(report.saliency.volume, folder / "saliency.nii.gz")
        files["saliency"] = "saliency.nii.gz"
    if prediction is not None and prediction.mask is not None:
        write_volume(prediction.mask, folder / "mask.nii.gz")
        files["mask"] = "mask.nii.gz"
        files.update(write_label_sidecars(pipeline, folder, "mask"))
    if report.volume is not None and prediction is not None:
        colours = {name: pipeline.report.colour(name, k)
                   for k, name in enumerate(pipeline.classes)}
        images = key_images(report.volume,
                            saliency=report.saliency.volume if report.saliency else None,
                            mask=prediction.mask if prediction is not None else None,
                            classes=pipeline.classes, colours=colours,
                            saliency_label=f"{report.saliency.method} attribution"
                            if report.saliency else "attribution")
        if prediction.boxes is not None and report.volume.spatial_dims == 2:
            images.append(_box_image(report, pipeline, colours))
        for image in images:
            image.save(folder)
        files["overlays"] = [i.name for i in images if i.kind == "overlay"]
    if options.dicom and report.sources and report.status in (Status.OK, Status.FLAGGED):
        written = write_dicom(report, pipeline, folder / "dicom",
                              overlays=[i for i in images if i.kind == "overlay"],
                              predecessors=predecessors)
        files["dicom"] = [{"kind": d.kind, "file": f"dicom/{d.path.name}",
                           "sop_instance_uid": d.sop_instance_uid,
                           "series_instance_uid": d.series_instance_uid,
                           "sop_class_uid": d.sop_class_uid} for d in written]
    timings["figures_s"] = time.perf_counter() - t0
    report = replace(report, files=files)
    write_text_atomic(folder / "report.html",
                      render_study(report, [i.name for i in images], predictor.bundle.card))
    return report


def _box_image(report: StudyReport, pipeline: Any,
               colours: Mapping[str, tuple[int, int, int]]) -> KeyImage:
    """``overlay_boxes.png``: the detected boxes with class and score."""
    import numpy as np

    from medvision.report.figures import box_figure, png_bytes

    prediction = report.prediction
    assert prediction is not None and report.volume is not None
    counts = ", ".join(f"{n} {c}" for n, c in prediction.counts.items())
    fig = box_figure(np.asarray(report.volume.array), prediction.boxes, prediction.box_labels,
                     pipeline.classes, colours, scores=prediction.box_scores,
                     title=f"detections: {counts}")
    return KeyImage(name="overlay_boxes.png", kind="overlay", plane="image",
                    png=png_bytes(fig))


def replaced_summary(previous: dict[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
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
        report: the study's report (without arrays: see :meth:`StudyReport.light`).
        document: its ``report.json`` content.
        staging: the folder holding its outputs until they are published.
        patient_key: keyed pseudonym of the Patient ID, when there is one.
        study_key: keyed pseudonym of the Study Instance UID (or of the file's hash).
        inputs: input hashes for the audit record.
    """

    study: str
    report: StudyReport
    document: dict[str, Any]
    staging: Path
    patient_key: str | None
    study_key: str
    inputs: dict[str, Any]


#: Errors of the machine (disk full, quota, read-only or failing storage), not of the study.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _environment_error(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is a full, read-only or failing disk;
    libraries such as pydicom re-raise the ``OSError`` without its errno."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _ENVIRONMENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _failed(study: Study, draft: _Draft | None, base: dict[str, Any],
            timings: dict[str, float], error: Exception, staging: Path,
            predictor: Predictor) -> StudyReport:
    """The report of a study whose processing raised ``error`` (its outputs removed)."""
    status, reason = Status.FAILED, f"internal error: {type(error).__name__}: {error}"
    if isinstance(error, DataError):
        status, reason = Status.REJECTED, str(error)
    elif isinstance(error, MedvisionError):
        reason = str(error)
    else:
        log.exception("study %s failed", study.key, exc_info=error)
    for child in staging.iterdir():  # no half-written outputs beside a failure
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    report = StudyReport(status=status, reason=reason,
                         input=draft.input if draft else _input_summary(study, None, None),
                         timings=timings, **base)
    write_text_atomic(staging / "report.html", render_study(report, [], predictor.bundle.card))
    return report


def run_study(study: Study, predictor: Predictor, out: Path, options: AnalyzeOptions,
              pseudonymizer: Pseudonymizer, *,
              previous: dict[str, Any] | None = None,
              predecessors: Sequence[Any] = (),
              analysed: tuple[Any, dict[str, float]] | None = None) -> StudyOutcome:
    """Process one study into ``out/.<key>.partial``; never raises for a bad study.

    A study that cannot be read is ``rejected``; an error while processing makes it
    ``failed``; either way it gets a report. A full, read-only or failing disk is not the
    study's fault: that ``OSError`` propagates (nothing is staged), so the caller can retry.
    ``previous`` is the report this one replaces (summarised in its ``replaces`` section);
    ``predecessors`` are earlier DICOM SRs of the study that a new SR supersedes
    (``options.dicom``). ``analysed``: the study's draft (or the error that failed it) and
    its timings, when it was read and predicted in a batch; else that is done here.
    """
    staging = out / f".{study.key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    run = run_fingerprint(predictor, options, study)
    base: dict[str, Any] = {
        "study": study.key, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pipeline": pipeline_info(predictor), "software": software_versions(), "run": run,
        "replaces": replaced_summary(previous, run) if previous is not None else None}
    draft: _Draft | None = None
    try:
        if analysed is None:
            draft = _process(study, predictor, options, timings)
        else:  # read and predicted in a batch (analyze_batched)
            timings.update(analysed[1])
            if isinstance(analysed[0], BaseException):
                raise analysed[0]
            draft = analysed[0]
        report = StudyReport(status=draft.status, reason=draft.reason, input=draft.input,
                             prediction=draft.prediction, saliency=draft.saliency,
                             faithfulness=draft.faithfulness, qc=draft.qc, volume=draft.volume,
                             sources=draft.sources, timings=timings, **base)
        report = _render(report, predictor, staging, options, predecessors, timings)
    except Exception as e:  # noqa: BLE001 - one study must not end the batch
        if _environment_error(e):  # the machine's fault, not the study's: retry later
            shutil.rmtree(staging, ignore_errors=True)
            raise
        report = _failed(study, draft, base, timings, e, staging, predictor)
    timings["total_s"] = time.perf_counter() - started
    report = replace(report, timings=dict(timings))
    document = to_document(report)
    write_text_atomic(staging / "report.json", json.dumps(document, indent=2))
    entry = draft.entry if draft is not None else None
    try:
        with reading(study.key, "identifiers for the audit record", InvalidDicomError):
            patient, study_key, inputs = _input_digest(study, entry, pseudonymizer)
    except DataError as e:  # a file changed or vanished, or a malformed identifier
        log.warning("study %s: cannot hash its inputs (%s)", study.key, e)
        patient, study_key = None, pseudonymizer.pseudonym("study", study.key)
        inputs = {"source_name": study.source_name, "error": str(e)}
    if report.input.synthetic is not None:  # the audit trail says so too: never a patient
        inputs = {**inputs, "synthetic": dict(report.input.synthetic)}
    if options.fhir and report.status in (Status.OK, Status.FLAGGED):
        from medvision.report.fhir import render_fhir

        write_text_atomic(staging / "fhir.json", render_fhir(
            report, predictor.pipeline, subject_key=patient or study_key))
    return StudyOutcome(study=study.key, report=report.light(), document=document,
                        staging=staging, patient_key=patient, study_key=study_key,
                        inputs=inputs)
