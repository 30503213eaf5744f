"""HTML pages from Jinja2 templates with one stylesheet: the study report, the batch summary,
the evaluation page and the audit report (``medvision/report/templates/``).

Every page is self-contained (the stylesheet is inlined; images are files beside the page or
inlined PNG) and autoescaped; model-card Markdown is rendered with markdown-it-py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from medvision._version import __version__

if TYPE_CHECKING:
    import jinja2

    from medvision.report.study import StudyReport

__all__ = ["NOTICE", "card_sections", "render_audit", "render_evaluation", "render_study",
           "render_summary", "render_synthetic"]

NOTICE = ("Research use only. Not for diagnostic use: this output has not been cleared by any "
          "regulator and must not guide patient care.")


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("medvision.report", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def _render(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(version=__version__, notice=NOTICE,
                                                        **values)


def markdown(text: str) -> str:
    """Markdown to HTML (CommonMark with tables; raw HTML in the source is escaped)."""
    from markdown_it import MarkdownIt

    return str(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def card_sections(card: str | None) -> dict[str, str]:
    """``summary`` (the first paragraph), ``intended_use`` and ``limitations`` of a model
    card, as HTML."""
    if not card:
        return {"summary": "<p>No model card found for this pipeline.</p>",
                "intended_use": "", "limitations": ""}
    sections: dict[str, str] = {}
    for match in re.finditer(r"^## +(.+?)\s*$(.*?)(?=^## |\Z)", card, flags=re.M | re.S):
        sections[match.group(1).strip().lower()] = match.group(2).strip()
    body = re.sub(r"^# .*$", "", card, count=1, flags=re.M).strip()
    summary = body.split("\n\n", 1)[0].strip() if body else ""
    return {"summary": markdown(summary),
            "intended_use": markdown(sections.get("intended use", "")),
            "limitations": markdown(sections.get("limitations", ""))}


def render_study(report: StudyReport, images: Sequence[str], card: str | None) -> str:
    """``report.html`` for one study; ``images`` are file names beside it."""
    prediction = report.prediction
    top = None
    probabilities: list[tuple[str, float]] = []
    if prediction is not None and prediction.probabilities is not None:
        probabilities = list(zip(prediction.classes, prediction.probabilities, strict=True))
        top = dict(probabilities).get(prediction.label)
    from medvision.report.json import finding_sentence, prediction_values

    finding = (finding_sentence(prediction_values(prediction), report.pipeline.class_names)
               if prediction is not None else None)
    return _render("study.html", r=report, p=prediction, top=top, probabilities=probabilities,
                   finding=finding,
                   geometry=report.input.geometry, images=list(images),
                   dicom=list(report.files.get("dicom", [])), card=card_sections(card))


def render_summary(rows: Sequence[Mapping[str, Any]], pipeline: str,
                   score_columns: Sequence[str], notes: Sequence[str] = ()) -> str:
    """``summary.html``: one row per study, linked to its report; ``score_columns`` are the
    numeric per-class columns of ``summary.csv`` shown as they are there; ``notes`` are
    said once for the batch (pictures without a physical size, files skipped)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return _render("summary.html", rows=rows, pipeline=pipeline, tally=tally,
                   score_columns=list(score_columns), notes=list(notes))


def _number(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """The metrics of an evaluation as table rows: name, value, interval, interval method."""
    rows = []

    def add(name: str, item: Mapping[str, Any]) -> None:
        unit = str(item.get("unit", ""))
        low, high = item.get("ci95") or (None, None)
        rows.append({"name": name, "value": _number(item.get("value"), unit),
                     "ci": f"{_number(low)} – {_number(high, unit)}",
                     "method": str(item.get("ci_method", ""))})

    for key, value in metrics.items():
        if isinstance(value, Mapping) and "value" in value:
            add(key.replace("_", " "), value)
        elif key == "explanation" and isinstance(value, Mapping):
            for sub, item in value.items():
                if isinstance(item, Mapping) and "value" in item:
                    add(f"explanation ({value.get('method', '')}): {sub.replace('_', ' ')}",
                        item)
        elif key == "per_fold" and isinstance(value, Mapping):
            for fold, entry in value.items():
                if isinstance(entry, Mapping):
                    for metric, item in entry.items():
                        if isinstance(item, Mapping) and "value" in item:
                            add(f"{fold} ({entry['n']} cases): {metric}", item)
        elif (key.endswith("_per_class") or key == "per_class") and isinstance(value, Mapping):
            for name, item in value.items():
                if isinstance(item, Mapping) and "value" in item:
                    add(f"{key.removesuffix('_per_class').replace('_', ' ')}: {name}", item)
                elif isinstance(item, Mapping):
                    for metric, sub in item.items():
                        if isinstance(sub, Mapping) and "value" in sub:
                            add(f"{metric.replace('_', ' ')}: {name}", sub)
    return rows


def render_evaluation(metrics: Mapping[str, Any], images: Sequence[str]) -> str:
    """The evaluation page (``summary.html`` of an evaluation folder)."""
    return _render("evaluation.html", pipeline=metrics["pipeline"], n=metrics["n"],
                   split=metrics.get("split"), skipped=metrics.get("skipped_items") or [],
                   method=metrics.get("interval_note", ""), rows=metric_rows(metrics),
                   synthetic=metrics.get("synthetic_items", 0),
                   device=metrics.get("device"), images=list(images))


def render_synthetic(quality: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The synthetic-image quality and memorisation page (``memorisation.html``)."""
    return _render("synthetic.html", q=quality, rows=list(rows))


def render_audit(summary: Mapping[str, Any], *, verified: str, drift_png: str) -> str:
    """The audit report page; ``drift_png`` is the drift plot, base64."""
    import json

    def actor(value: Any) -> str:
        if not value:
            return ""
        if isinstance(value, Mapping):
            return ", ".join(f"{k}={v}" for k, v in value.items())
        return str(value)

    studies = [(s["study_key"], s["time"], actor(s.get("actor")), s["status"], s["label"],
                s["model"], json.dumps(s["inputs"])[:300],
                "; ".join(f"{o['path']} {o['sha256'][:12]}" for o in s["outputs"] or []))
               for s in summary["studies"]]
    return _render(
        "audit.html", s=summary, verified=verified, drift_png=drift_png,
        drift_rows=[(m, d, v["positive"], v["total"], f"{v['rate']:.3f}")
                    for m, days in summary["positive_rate"].items() for d, v in days.items()],
        latency_rows=[(m, v["n"], f"{v['p50']:.3f}", f"{v['p90']:.3f}", f"{v['p99']:.3f}")
                      for m, v in summary["latency_s"].items()],
        rejected_rows=[(r["seq"], r["time"], r["study_key"], r["reason"])
                       for r in summary["rejected"]],
        failure_rows=[(r["seq"], r["time"], r["study_key"], r["reason"])
                      for r in summary["failures"]],
        study_rows=studies,
        tracked_rows=[(sha[:16], v.get("model", ""), v.get("version", ""),
                       ", ".join(r.get("url") or r.get("run_id", "") for r in v.get("runs", [])),
                       v.get("error", ""))
                      for sha, found in (summary.get("tracked") or {}).items()
                      for v in (found or [{"error": "not registered"}])])
