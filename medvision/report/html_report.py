"""``report.html`` for one study and ``summary.html`` for a batch."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["study_html", "summary_html"]

NOTICE = ("Research use only. Not for diagnostic use: this output has not been cleared by any "
          "regulator and must not guide patient care.")

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#222}
.notice{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;font-weight:600}
.status-ok{color:#126b2f}.status-rejected,.status-failed,.status-conflict{color:#a11}
.status-flagged{color:#8a5a00}
.flag-banner{background:#fde2c8;border:2px solid #c2570c;padding:.7em 1em;margin:.8em 0}
.flag-banner strong{color:#8a2c00}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:left}
figure{display:inline-block;margin:.4em;vertical-align:top}figure img{max-height:22em}
.flag-warn{color:#8a5a00}.flag-reject{color:#a11}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _markdown_list(text: str) -> str:
    items = [line.lstrip("-* ").strip() for line in text.splitlines() if line.strip()]
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>" if items else ""


def study_html(report: Mapping[str, Any], images: Sequence[str], card: Mapping[str, str]) -> str:
    """The page for one study; ``images`` are file names in the same folder."""
    status = report["status"]
    pipeline = report["pipeline"]
    rows = []
    prediction = report.get("prediction")
    if prediction:
        rows.append(f"<tr><th>finding</th><td><strong>{_e(prediction['label'])}</strong></td></tr>")
        for name, p in (prediction.get("probabilities") or {}).items():
            rows.append(f"<tr><th>P({_e(name)})</th><td>{p:.3f}</td></tr>")
        if prediction.get("threshold") is not None:
            rows.append(f"<tr><th>decision threshold</th><td>{prediction['threshold']:.2f}</td></tr>")
        for name, ml in (prediction.get("volumes_ml") or {}).items():
            rows.append(f"<tr><th>volume {_e(name)}</th><td>{ml:.3f} mL</td></tr>")
    saliency = report.get("saliency")
    if saliency:
        rows.append(f"<tr><th>saliency</th><td>{_e(saliency['method'])} "
                    f"({_e(saliency.get('target', ''))})</td></tr>")
        faith = saliency.get("faithfulness")
        if faith:
            rows.append(f"<tr><th>deletion AUC</th><td>{faith['deletion_auc']:.3f} (random order "
                        f"{faith['random_deletion_auc']:.3f}; lower is more faithful)</td></tr>")
    qc = report["qc"]
    flags = "".join(f'<li class="flag-{_e(f["severity"])}">{_e(f["code"])}: {_e(f["message"])}</li>'
                    for f in qc["flags"])
    if qc.get("out_of_distribution"):
        flags += ('<li class="flag-warn">out_of_distribution: the input is far from the training '
                  f'data (distance {qc["ood_distance"]:.1f} &gt; {qc["ood_threshold"]:.1f}); '
                  "treat the result with extra caution</li>")
    figures = "".join(f'<figure><img src="{_e(name)}" alt="{_e(name)}"><figcaption>{_e(name)}'
                      "</figcaption></figure>" for name in images)
    reason = ""
    if status == "flagged":
        withheld = bool(qc.get("withheld"))
        title = ("Result withheld" if withheld
                 else "Flagged: this result may not apply to this input")
        reason = (f'<div class="flag-banner" role="alert"><strong>{_e(title)}.</strong> '
                  f"{_e(report.get('reason') or '')}</div>")
    elif report.get("reason"):
        reason = f"<p><strong>Reason:</strong> {_e(report['reason'])}</p>"
    replaces = report.get("replaces")
    if replaces:
        changed = (f"changed: {_e(', '.join(replaces['changed']))}" if replaces["changed"]
                   else "nothing changed, re-run on request (--force)")
        reason += (f"<p>Replaces an earlier report of {_e(replaces['created'])} "
                   f"({_e(replaces.get('pipeline', ''))}, {_e(replaces['status'])}); "
                   f"{changed}.</p>")
    unreadable = report["input"].get("unreadable_files") or []
    if unreadable:
        reason += ("<p>Files left out (could not be decoded):</p><ul>" + "".join(
            f"<li>{_e(u['file'])}: {_e(u['reason'])}</li>" for u in unreadable) + "</ul>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(report['study'])}: {_e(pipeline['name'])}</title>
<style>{_STYLE}</style></head><body>
<p class="notice">{_e(NOTICE)}</p>
<h1>Study {_e(report['study'])}</h1>
<p>Status: <strong class="status-{_e(status)}">{_e(status)}</strong>. Pipeline
<code>{_e(pipeline['name'])}</code> {_e(pipeline['version'])}, weights
<code>{_e(pipeline['weights_sha256'][:16])}</code>. Created {_e(report['created'])}.</p>
{reason}
<table>{''.join(rows)}</table>
<h2>Images</h2><div>{figures or '<p>none</p>'}</div>
<h2>Quality checks</h2><ul>{flags or '<li>no flags</li>'}</ul>
<h2>About the model</h2><p>{_e(card.get('summary', ''))}</p>
<h3>Intended use</h3>{_markdown_list(card.get('intended_use', ''))}
<h3>Limitations</h3>{_markdown_list(card.get('limitations', ''))}
<p class="notice">{_e(NOTICE)}</p>
</body></html>
"""


def summary_html(rows: Sequence[Mapping[str, Any]], pipeline: str) -> str:
    """The batch page: one row per study with a link to its report."""
    lines = []
    for row in rows:
        link = f'<a href="{_e(row["study"])}/report.html">{_e(row["study"])}</a>'
        lines.append(f"<tr><td>{link}</td><td class=\"status-{_e(row['status'])}\">"
                     f"{_e(row['status'])}</td><td>{_e(row['label'])}</td><td>{_e(row['score'])}"
                     f"</td><td>{_e(row['qc'])}</td><td>{_e(row['reason'])}</td></tr>")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medvision batch: {_e(pipeline)}</title>
<style>{_STYLE}</style></head><body>
<p class="notice">{_e(NOTICE)}</p>
<h1>Batch analysis with {_e(pipeline)}</h1><p>{len(rows)} studies: {_e(tally)}.</p>
<table><tr><th>study</th><th>status</th><th>finding</th><th>score</th><th>QC</th><th>reason</th></tr>
{''.join(lines)}</table></body></html>
"""
