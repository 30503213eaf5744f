"""``medvision audit verify|report``: check the hash chain, write audit reports."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision.cli.audit_options import default_log_path
from medvision.errors import AuditError

__all__ = ["add_parser", "run"]


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_parser(subparsers: Any) -> None:
    """Register ``audit`` with its ``verify`` and ``report`` actions."""
    parser = subparsers.add_parser("audit", help="verify the audit log or report on it")
    actions = parser.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check the hash chain; exit 1 if broken",
                                description="Detects any edited, deleted, inserted or "
                                            "reordered record and names the first bad one.")
    verify.add_argument("--log", type=Path, default=None, help="audit log (SQLite)")
    verify.set_defaults(run=run)
    report = actions.add_parser("report", help="write an audit report")
    report.add_argument("--log", type=Path, default=None, help="audit log (SQLite)")
    report.add_argument("--since", type=_when, help="ISO date or time (UTC), inclusive")
    report.add_argument("--until", type=_when, help="ISO date or time (UTC), exclusive")
    report.add_argument("--format", choices=["html", "csv", "json"], default="html")
    report.add_argument("-o", "--output", type=Path, required=True, help="report file")
    report.add_argument("--force", action="store_true", help="overwrite the report file")
    report.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Verify or report."""
    from medvision.audit.log import AuditLog
    from medvision.audit.report import audit_summary, render_csv, render_html, select_records

    log = AuditLog(args.log or default_log_path())
    result = log.verify()
    verified = ("intact" if result.ok else
                f"BROKEN at record {result.first_bad}: {result.problem}")
    if args.audit_action == "verify":
        print(f"{log.path}: {result.records} records, chain {verified}")
        return 0 if result.ok else 1
    if args.output.exists() and not args.force:
        raise AuditError(f"{args.output} exists; pass --force to overwrite")
    records = select_records(log.records(), since=args.since, until=args.until)
    if args.format == "csv":
        text = render_csv(records)
    else:
        summary = audit_summary(records)
        summary["verification"] = verified
        text = json.dumps(summary, indent=2) if args.format == "json" else \
            render_html(summary, verified=verified)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(records)} records; chain {verified})")
    return 0 if result.ok else 1
