"""Analyze a batch: studies in, one audited folder per study out, plus a summary.

Each study is processed into a staging folder (in this process, or on a Dask worker with
``scheduler=``), then its audit record is appended here, in this one process, and only then
is the folder moved into place. So no result exists without its record, the audit log has a
single writer, and a study rerun after a worker died still yields exactly one report and one
record.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from medvision.analyze.runner import (
    AnalyzeOptions,
    StudyInput,
    StudyOutcome,
    analyse_inputs,
    read_study,
    replaced_summary,
    run_fingerprint,
    run_study,
)
from medvision.analyze.studies import Study, find_studies
from medvision.atomic import write_text_atomic
from medvision.audit.records import Auditor, AuditRecord
from medvision.errors import AuditError, ConfigError
from medvision.infer import LazyPredictor, Predictor
from medvision.report.html import render_summary

__all__ = ["StudyResult", "analyze", "analyze_batched", "commit"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyResult:
    """The outcome of one study, as the batch summary lists it.

    ``status`` is the report's (``ok``, ``flagged``, ``rejected``, ``failed``) or
    ``conflict``: an existing report made differently was kept (``overwrite=False``).
    ``skipped``: the existing report matched this run and was reused; ``replaced``: this run
    replaced an older report made differently.
    """

    study: str
    status: str
    reason: str | None
    label: str
    scores: dict[str, float]
    qc: str
    folder: Path
    skipped: bool = False
    replaced: bool = False


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


def commit(outcome: StudyOutcome, auditor: Auditor, out: Path) -> None:
    """Append the study's audit record, then publish its folder.

    Raises:
        AuditError: the record could not be written; the staged outputs are removed.
    """
    report = outcome.report
    prediction = report.prediction
    outputs = tuple({"path": f"{outcome.study}/{o['path']}", "sha256": o["sha256"]}
                    for o in Auditor.outputs(sorted(outcome.staging.rglob("*")),
                                             relative_to=outcome.staging))
    p = report.pipeline
    try:
        auditor.record(AuditRecord(
            action="analyze", status=str(report.status), actor=auditor.actor,
            reason=report.reason, patient_key=outcome.patient_key,
            study_key=outcome.study_key, inputs=outcome.inputs,
            pipeline={"name": p.name, "version": p.version, "task": p.task,
                      "weights_sha256": p.weights_sha256, "config_hash": p.config_hash,
                      "temperature": p.temperature, "backend": p.backend,
                      **({"device": dict(p.device)} if p.device else {})},
            software=dict(report.software), outputs=outputs,
            result={"label": prediction.label if prediction else None,
                    "positive": report.positive,
                    "probabilities": dict(zip(prediction.classes, prediction.probabilities,
                                              strict=True))
                    if prediction and prediction.probabilities is not None else None,
                    "volumes_ml": {k: round(v, 4) for k, v in prediction.volumes_ml.items()}
                    if prediction and prediction.volumes_ml else None,
                    "counts": dict(prediction.counts) if prediction and prediction.counts
                    else None,
                    "out_of_distribution": report.qc.out_of_distribution,
                    "flagged_by": list(report.qc.flagged_by),
                    "withheld": report.qc.withheld,
                    "replaces": dict(report.replaces) if report.replaces else None,
                    "study": outcome.study},
            durations={k: round(v, 4) for k, v in report.timings.items()}))
    except AuditError:
        shutil.rmtree(outcome.staging, ignore_errors=True)
        raise
    _publish(outcome.staging, out / outcome.study)


class _StudyReader(Dataset[StudyInput]):
    """The studies of a batch as a map-style dataset: item k is study k read, checked and
    preprocessed (in a DataLoader worker process; no network there)."""

    def __init__(self, studies: Sequence[Study], pipeline: Any, options: AnalyzeOptions,
                 threads: int = 1) -> None:
        self.studies, self.pipeline, self.options = list(studies), pipeline, options
        self.threads = threads

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> StudyInput:
        import pickle

        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            import torch

            # the analysing process's thread count: PyTorch's parallel reductions in the
            # preprocessing round differently with another count (inputs by ~1e-7, which
            # gradient saliency can carry to ~1e-3), and a study must come out the same
            # whether read here or there
            torch.set_num_threads(self.threads)
        item = read_study(self.studies[index], self.pipeline, self.options)
        if get_worker_info() is None:
            return item
        if item.prepared is not None:
            from monai.utils import TraceKeys

            # the transforms are rebuilt on the way back (new objects): inverting them must
            # not ask for the objects that were applied, only for their order and kind
            for operation in item.prepared.data["image"].applied_operations:
                operation[TraceKeys.ID] = TraceKeys.NONE
        try:  # what cannot travel back would hang the loader: fail the study instead
            pickle.dumps(item)
        except Exception as e:  # noqa: BLE001 - one study must not end the batch
            return StudyInput(study=item.study, timings=item.timings,
                              error=RuntimeError(f"the study's data cannot be passed between "
                                                 f"processes ({type(e).__name__}); analyse "
                                                 "it with --workers 0"))
        return item


def _as_list(batch: list[StudyInput]) -> list[StudyInput]:
    return batch


def reader_processes(options: AnalyzeOptions, studies: int) -> int:
    """How many processes read ahead: ``options.workers``, else up to 4 (one per core) when
    there is more than one batch to read."""
    if options.workers is not None:
        return max(0, options.workers)
    if studies <= options.batch_size:
        return 0
    return max(1, min(4, os.cpu_count() or 1))


def analyze_batched(studies: Sequence[Study], predictor: Predictor, out: Path,
                    options: AnalyzeOptions, pseudonymizer: Any, *,
                    previous: dict[str, dict[str, Any]]) -> Iterator[StudyOutcome]:
    """Analyze studies as a stream that keeps the device busy, yielding outcomes in order.

    Three stages overlap: reader processes (a PyTorch DataLoader with prefetch) read and
    preprocess the next studies; this process runs the networks on batches of
    ``options.batch_size`` (predictions, then saliency) on the predictor's device; a pool
    of threads writes each study's files (maps, figures, page, DICOM) while the next batch
    runs. At most two batches are in flight, so memory does not grow with the batch.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch
    from torch.utils.data import DataLoader

    workers = reader_processes(options, len(studies))
    loader: DataLoader[StudyInput] = DataLoader(_StudyReader(studies, predictor.pipeline, options,
                                     threads=torch.get_num_threads()),
                        batch_size=options.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list, prefetch_factor=2 if workers else None,
                        persistent_workers=False,
                        # spawned, not forked: a fork of a process whose OpenMP threads
                        # have run (PyTorch's CPU kernels) can deadlock in the child
                        multiprocessing_context="spawn" if workers else None)
    pending: deque[Future[StudyOutcome]] = deque()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="medvision-writer") as pool:
        for items in loader:
            results = analyse_inputs(items, predictor, options)
            for item, result in zip(items, results, strict=True):
                pending.append(pool.submit(
                    run_study, item.study, predictor, out, options, pseudonymizer,
                    previous=previous.get(item.study.key), analysed=(result, item.timings)))
            while len(pending) > 2 * options.batch_size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _existing_report(path: Path) -> dict[str, Any] | None:
    """A study's earlier report, or ``None`` when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable earlier report, the study is analysed again (%s)", path, e)
        return None
    return report if isinstance(report, dict) else None


def _input_path(study: Study) -> str:
    """The file a study came from, or the folder holding its files."""
    if not study.paths:
        return ""
    if len(study.paths) == 1:
        return study.paths[0]
    return os.path.commonpath([os.path.abspath(p) for p in study.paths])


def score_columns(classes: Sequence[str], task: str) -> list[str]:
    """The numeric per-class columns of ``summary.csv``."""
    if task == "segmentation":
        return [f"volume_ml_{c}" for c in classes[1:]]
    if task == "detection":
        return [f"count_{c}" for c in classes]
    return [f"p_{c}" for c in classes]


def _summary_row(report: dict[str, Any], study: Study, columns: Sequence[str]) -> dict[str, Any]:
    pred = report.get("prediction") or {}
    qc = report.get("qc") or {}
    notes = [f["code"] for f in qc.get("flags", []) if f["severity"] == "warn"]
    if qc.get("out_of_distribution"):
        notes.append("out_of_distribution")
    label = "(withheld)" if qc.get("withheld") else pred.get("label", "")
    row: dict[str, Any] = {"study": report["study"], "input": _input_path(study),
                           "status": report["status"], "label": label}
    values = {f"p_{k}": v for k, v in (pred.get("probabilities") or {}).items()}
    values.update({f"volume_ml_{k}": v for k, v in (pred.get("volumes_ml") or {}).items()})
    values.update({f"count_{k}": v for k, v in (pred.get("counts") or {}).items()})
    for column in columns:
        value = values.get(column)
        row[column] = "" if value is None else f"{value:.6g}"
    row.update({"qc": ",".join(dict.fromkeys(notes)), "reason": report.get("reason") or ""})
    return row


def analyze(inputs: Iterable[str | os.PathLike[str]], predictor: Predictor | LazyPredictor,
            out_dir: str | os.PathLike[str], *, auditor: Auditor,
            options: AnalyzeOptions | None = None,
            scheduler: str | None = None) -> list[StudyResult]:
    """Analyze every study under ``inputs``; returns one result per study.

    Args:
        inputs: files and folders.
        predictor: the pipeline to run (in this process; workers load the same pipeline and
            weights by path); a :class:`LazyPredictor` builds its networks only when a study
            needs analysing.
        out_dir: output folder.
        auditor: where records go; every analysed study gets one.
        options: saliency method, faithfulness, force, PHI.
        scheduler: a Dask scheduler address (``tcp://host:port``) to run studies on its
            workers; ``None`` runs them here.

    Raises:
        ConfigError: no study at all under ``inputs`` (nothing is written).
        AuditError: a record could not be written; the batch stops there.
    """
    from tqdm import tqdm

    options = options or AnalyzeOptions()
    given = [str(p) for p in inputs]
    search = find_studies(given, pseudonymizer=auditor.pseudonymizer)
    studies = list(search.studies)
    if search.skipped:
        names = ", ".join(Path(p).name for p in search.skipped[:5])
        log.warning("%d file(s) skipped: not images (%s%s)", len(search.skipped), names,
                    ", ..." if len(search.skipped) > 5 else "")
    if not studies:
        where = ", ".join(given) or "(no input)"
        found = (f"{search.files} file(s), none an image or DICOM file"
                 if search.files else "no file")
        raise ConfigError(f"no study found in {where}: {found}; check the path (images: "
                          "DICOM, NIfTI, NRRD/MHA, PNG/JPEG/TIFF/BMP)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if options.progress is None else options.progress
    reports: dict[str, tuple[dict[str, Any], bool]] = {}
    conflicts: dict[str, str] = {}
    previous: dict[str, dict[str, Any]] = {}
    todo: list[Study] = []
    for study in studies:
        old = _existing_report(out / study.key / "report.json")
        if old is None:
            todo.append(study)
            continue
        run = run_fingerprint(predictor, options, study)
        if old.get("run") == run and old.get("status") != "failed" and not options.force:
            reports[study.key] = (old, True)
        elif options.overwrite or options.force:
            previous[study.key] = old
            todo.append(study)
        else:
            changed = replaced_summary(old, run)["changed"]
            conflicts[study.key] = (f"an existing report ({old.get('created', '?')}) was made "
                                    f"differently ({', '.join(changed)} differ); kept, not "
                                    "overwritten (--no-overwrite)")
            reports[study.key] = (old, True)
    bar = tqdm(total=len(todo), desc="studies", disable=not show, unit="study")
    outcomes: Iterable[StudyOutcome] = ()
    if todo and scheduler is None:  # the networks are built only now, when a study needs them
        outcomes = analyze_batched(todo, predictor.load(), out, options,
                                   auditor.pseudonymizer, previous=previous)
    elif todo and scheduler is not None:
        from medvision.analyze.distributed import run_on_cluster

        outcomes = run_on_cluster(todo, predictor, out, options, auditor.pseudonymizer,
                                  scheduler=scheduler, previous=previous,
                                  device=options.device)
    for outcome in outcomes:
        commit(outcome, auditor, out)
        reports[outcome.study] = (outcome.document, False)
        log.info("%s: %s", outcome.study, outcome.document["status"])
        bar.update(1)
    bar.close()
    for key in reports:  # a worker that died after finishing may have left a second try
        shutil.rmtree(out / f".{key}.partial", ignore_errors=True)
    results, rows = [], []
    pipeline = predictor.pipeline
    columns = score_columns(pipeline.classes, str(pipeline.task))
    for study in studies:
        report, skipped = reports[study.key]
        row = _summary_row(report, study, columns)
        if study.key in conflicts:
            row.update(status="conflict", reason=conflicts[study.key])
        rows.append(row)
        results.append(StudyResult(study=study.key, status=row["status"],
                                   reason=row["reason"] or None, label=row["label"],
                                   scores={c: float(row[c]) for c in columns if row[c] != ""},
                                   qc=row["qc"], folder=out / study.key,
                                   skipped=skipped,
                                   replaced=bool(report.get("replaces")) and not skipped))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study", "input", "status", "label",
                                                    *columns, "qc", "reason"])
        writer.writeheader()
        writer.writerows(rows)
    notes = []
    pictures = sum(((r.get("input") or {}).get("geometry") or {}).get("spacing_known") is False
                   for r, _ in reports.values())
    if pictures:
        notes.append(f"{pictures} of the {len(rows)} inputs are pictures (PNG, JPEG...) without "
                     "a physical size: their grids are in pixels, and no size in mm is "
                     "derived from them.")
        log.info("%d input(s) are pictures without a physical size (sizes in pixels)", pictures)
    if search.skipped:
        notes.append(f"{len(search.skipped)} file(s) skipped, not images: "
                     + ", ".join(Path(p).name for p in search.skipped[:10])
                     + (", ..." if len(search.skipped) > 10 else "") + ".")
    write_text_atomic(out / "summary.html", render_summary(rows, pipeline.name, columns,
                                                           notes))
    return results
