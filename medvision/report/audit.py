"""Audit reports: what was analysed, by which model, with what result, and how fast.

Counts by status, pipeline and model version; the positive-finding rate per model version per
day (a drift view, with a plot in the HTML form); rejected inputs and failures with reasons;
latency percentiles; and per-study traceability from a study key to input hashes, model and
output hashes.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
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


def _drift_png(summary: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.dates import date2num

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for model, days in summary["positive_rate"].items():
        dates = [date2num(datetime.fromisoformat(d)) for d in days]
        ax.plot(dates, [v["rate"] for v in days.values()], "o-", label=model)
    ax.xaxis_date()
    ax.set(ylabel="positive-finding rate", ylim=(0, 1), title="Positive findings per model version")
    if summary["positive_rate"]:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict[str, Any], *, verified: str) -> str:
    """The audit report as one self-contained HTML page."""
    latency = _table(((m, v["n"], f"{v['p50']:.3f}", f"{v['p90']:.3f}", f"{v['p99']:.3f}")
                      for m, v in summary["latency_s"].items()),
                     ("model", "n", "p50 s", "p90 s", "p99 s"))
    drift = _table(((m, d, v["positive"], v["total"], f"{v['rate']:.3f}")
                    for m, days in summary["positive_rate"].items() for d, v in days.items()),
                   ("model", "day", "positive", "total", "rate"))
    studies = _table(((s["study_key"], s["time"], s["status"], s["label"], s["model"],
                       json.dumps(s["inputs"])[:300],
                       "; ".join(f"{o['path']} {o['sha256'][:12]}" for o in s["outputs"] or []))
                      for s in summary["studies"]),
                     ("study key", "time", "status", "finding", "model", "inputs", "outputs"))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>medvision audit report</title><style>body{{font-family:sans-serif;margin:2em}}
td,th{{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left;font-size:.9em}}</style>
</head><body><h1>Audit report</h1>
<p>{summary['records']} records from {html.escape(str(summary['first']))} to
{html.escape(str(summary['last']))}. Chain verification: <strong>{html.escape(verified)}</strong>.</p>
<h2>Counts</h2>
{_table(summary['by_status'].items(), ('status', 'records'))}
{_table(summary['by_pipeline'].items(), ('pipeline', 'records'))}
{_table(summary['by_model_version'].items(), ('model version', 'records'))}
<h2>Positive-finding rate over time</h2>
<img alt="positive-finding rate per model version" src="data:image/png;base64,{_drift_png(summary)}">
{drift}
<h2>Latency</h2>{latency}
<h2>Rejected inputs</h2>{_table(((r['seq'], r['time'], r['study_key'], r['reason']) for r in summary['rejected']), ('record', 'time', 'study key', 'reason'))}
<h2>Failures</h2>{_table(((r['seq'], r['time'], r['study_key'], r['reason']) for r in summary['failures']), ('record', 'time', 'study key', 'reason'))}
<h2>Per-study traceability</h2>{studies}
</body></html>
"""
