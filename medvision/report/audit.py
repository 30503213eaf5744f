"""Audit reports: what was analysed, by which model, with what result, and how fast.

Counts by status, pipeline and model version; the positive-finding rate per model version per
day (a drift view, with a plot in the HTML form); rejected inputs and failures with reasons;
latency percentiles; and per-study traceability from a study key to input hashes, model and
output hashes.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np

__all__ = ["audit_summary", "render_csv", "render_html", "select_records"]


def select_records(records: Iterable[dict[str, Any]], *, since: datetime | None = None,
                   until: datetime | None = None) -> list[dict[str, Any]]:
    """Records whose time lies in ``[since, until)``."""
    out = []
    for record in records:
        time = datetime.fromisoformat(record["time"])
        if (since is None or time >= since) and (until is None or time < until):
            out.append(record)
    return out


def _model(record: dict[str, Any]) -> str:
    pipeline = record.get("pipeline") or {}
    return (f"{pipeline.get('name', '?')} {pipeline.get('version', '?')} "
            f"({str(pipeline.get('weights_sha256', ''))[:12]})")


def audit_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything an audit report shows, as a JSON-ready dict."""
    by_status = Counter(r["status"] for r in records)
    by_action = Counter(r["action"] for r in records)
    by_pipeline = Counter((r.get("pipeline") or {}).get("name", "?") for r in records)
    by_model = Counter(_model(r) for r in records)
    drift: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    latency: dict[str, list[float]] = defaultdict(list)
    rejected, failures, studies = [], [], []
    for r in records:
        result = r.get("result") or {}
        if r["status"] == "ok" and result.get("positive") is not None:
            cell = drift[_model(r)][r["time"][:10]]
            cell[0] += int(bool(result["positive"]))
            cell[1] += 1
        if "total_s" in (r.get("durations") or {}):
            latency[_model(r)].append(float(r["durations"]["total_s"]))
        entry = {"seq": r["seq"], "time": r["time"], "study_key": r.get("study_key"),
                 "reason": r.get("reason")}
        if r["status"] == "rejected":
            rejected.append(entry)
        elif r["status"] == "failed":
            failures.append(entry)
        if r["action"] == "analyze":
            studies.append({"seq": r["seq"], "time": r["time"], "study_key": r.get("study_key"),
                            "patient_key": r.get("patient_key"), "status": r["status"],
                            "folder": result.get("study"), "label": result.get("label"),
                            "model": _model(r), "config_hash": (r.get("pipeline") or {}).get(
                                "config_hash"), "inputs": r.get("inputs"),
                            "outputs": r.get("outputs"), "actor": r.get("actor")})
    return {
        "records": len(records),
        "first": records[0]["time"] if records else None,
        "last": records[-1]["time"] if records else None,
        "by_status": dict(by_status), "by_action": dict(by_action),
        "by_pipeline": dict(by_pipeline), "by_model_version": dict(by_model),
        "positive_rate": {model: {day: {"positive": p, "total": n, "rate": p / n}
                                  for day, (p, n) in sorted(days.items())}
                          for model, days in drift.items()},
        "latency_s": {model: {"n": len(values),
                              **{f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}}
                      for model, values in latency.items()},
        "rejected": rejected, "failures": failures, "studies": studies,
    }


def render_csv(records: list[dict[str, Any]]) -> str:
    """One row per record."""
    buffer = io.StringIO()
    fields = ["seq", "time", "action", "status", "pipeline", "version", "weights_sha256",
              "study_key", "patient_key", "label", "positive", "total_s", "reason", "hash"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for r in records:
        pipeline, result = r.get("pipeline") or {}, r.get("result") or {}
        writer.writerow({"seq": r["seq"], "time": r["time"], "action": r["action"],
                         "status": r["status"], "pipeline": pipeline.get("name"),
                         "version": pipeline.get("version"),
                         "weights_sha256": pipeline.get("weights_sha256"),
                         "study_key": r.get("study_key"), "patient_key": r.get("patient_key"),
                         "label": result.get("label"), "positive": result.get("positive"),
                         "total_s": (r.get("durations") or {}).get("total_s"),
                         "reason": r.get("reason"), "hash": r["hash"]})
    return buffer.getvalue()


def render_html(summary: dict[str, Any], *, verified: str) -> str:
    """The audit report as one self-contained HTML page (template ``audit.html``)."""
    from medvision.report.figures import drift_plot
    from medvision.report.html import render_audit

    png = base64.b64encode(drift_plot(summary["positive_rate"])).decode()
    return render_audit(summary, verified=verified, drift_png=png)
