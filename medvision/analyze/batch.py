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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.analyze.runner import (
    AnalyzeOptions,
    StudyOutcome,
    replaced_summary,
    run_fingerprint,
    run_study,
)
from medvision.analyze.studies import Study, collect_studies
from medvision.atomic import write_text_atomic
from medvision.audit.records import Auditor, AuditRecord
from medvision.errors import AuditError
from medvision.infer import Predictor
from medvision.report.html_report import summary_html

__all__ = ["StudyResult", "analyze", "commit"]

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
    score: str
    qc: str
    folder: Path
    skipped: bool = False
    replaced: bool = False


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


def commit(outcome: StudyOutcome, auditor: Auditor, out: Path) -> None:
    """Append the study's audit record, then publish its folder.

    Raises:
        AuditError: the record could not be written; the staged outputs are removed.
    """
    report = outcome.report
    prediction = report.get("prediction") or {}
    outputs = tuple({"path": f"{outcome.study}/{o['path']}", "sha256": o["sha256"]}
                    for o in Auditor.outputs(outcome.staging.iterdir(),
                                             relative_to=outcome.staging))
    try:
        auditor.record(AuditRecord(
            action="analyze", status=report["status"], actor=auditor.actor,
            reason=report.get("reason"), patient_key=outcome.patient_key,
            study_key=outcome.study_key, inputs=outcome.inputs, pipeline=report["pipeline"],
            software=report["software"], outputs=outputs,
            result={"label": prediction.get("label"), "positive": _positive(prediction),
                    "probabilities": prediction.get("probabilities"),
                    "volumes_ml": prediction.get("volumes_ml"),
                    "out_of_distribution": (report.get("qc") or {}).get("out_of_distribution"),
                    "flagged_by": (report.get("qc") or {}).get("flagged_by") or [],
                    "withheld": bool((report.get("qc") or {}).get("withheld")),
                    "replaces": report.get("replaces"),
                    "study": outcome.study},
            durations=report["timings"]))
    except AuditError:
        shutil.rmtree(outcome.staging, ignore_errors=True)
        raise
    _publish(outcome.staging, out / outcome.study)


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
    label = "(withheld)" if qc.get("withheld") else pred.get("label", "")
    return {"study": report["study"], "status": report["status"],
            "label": label, "score": score, "qc": ",".join(dict.fromkeys(notes)),
            "reason": report.get("reason") or ""}
def analyze(inputs: Iterable[str | os.PathLike[str]], predictor: Predictor,
            out_dir: str | os.PathLike[str], *, auditor: Auditor,
            options: AnalyzeOptions | None = None,
            scheduler: str | None = None) -> list[StudyResult]:
    """Analyze every study under ``inputs``; returns one result per study.

    Args:
        inputs: files and folders.
        predictor: the pipeline to run (in this process; workers load the same pipeline and
            weights by path).
        out_dir: output folder.
        auditor: where records go; every analysed study gets one.
        options: saliency method, faithfulness, force, PHI.
        scheduler: a Dask scheduler address (``tcp://host:port``) to run studies on its
            workers; ``None`` runs them here.

    Raises:
        AuditError: a record could not be written; the batch stops there.
    """
    from tqdm import tqdm

    options = options or AnalyzeOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = collect_studies(inputs, pseudonymizer=auditor.pseudonymizer)
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
    if scheduler is None:
        outcomes: Iterable[StudyOutcome] = (
            run_study(study, predictor, out, options, auditor.pseudonymizer,
                      previous=previous.get(study.key)) for study in todo)
    else:
        from medvision.analyze.distributed import run_on_cluster

        outcomes = run_on_cluster(todo, predictor, out, options, auditor.pseudonymizer,
                                  scheduler=scheduler, previous=previous)
    for outcome in outcomes:
        commit(outcome, auditor, out)
        reports[outcome.study] = (outcome.report, False)
        log.info("%s: %s", outcome.study, outcome.report["status"])
        bar.update(1)
    bar.close()
    for key in reports:  # a worker that died after finishing may have left a second try
        shutil.rmtree(out / f".{key}.partial", ignore_errors=True)
    results, rows = [], []
    for study in studies:
        report, skipped = reports[study.key]
        row = _summary_row(report)
        if study.key in conflicts:
            row.update(status="conflict", reason=conflicts[study.key])
        rows.append(row)
        results.append(StudyResult(study=study.key, status=row["status"],
                                   reason=row["reason"] or None, label=row["label"],
                                   score=row["score"], qc=row["qc"], folder=out / study.key,
                                   skipped=skipped,
                                   replaced=bool(report.get("replaces")) and not skipped))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study", "status", "label", "score", "qc",
                                                    "reason"])
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(out / "summary.html", summary_html(rows, predictor.pipeline.name))
    return results
