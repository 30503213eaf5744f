"""``medvision audit keygen|verify|anchor|report``: keys, checks, anchors and reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision.cli.audit_options import default_log_path
from medvision.cli.conventions import examples
from medvision.errors import AuditError

__all__ = ["add_parser", "run"]


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_parser(subparsers: Any) -> None:
    """Register ``audit`` with its ``keygen``, ``verify``, ``anchor`` and ``report`` actions."""
    parser = subparsers.add_parser("audit", help="verify the audit log or report on it")
    actions = parser.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    keygen = actions.add_parser(
        "keygen", help="write an Ed25519 key pair for signing the log",
        description="Writes DIR/audit-signing.key (mode 0600; keep it apart from the log) and "
                    "DIR/audit-signing.pub (give it to auditors). Never overwrites a key.")
    keygen.add_argument("directory", type=Path, metavar="DIR")
    examples(keygen, "medvision audit keygen /etc/medvision/keys")
    keygen.set_defaults(run=run)
    verify = actions.add_parser(
        "verify", help="check the hash chain and signatures; exit 1 if anything fails",
        description="Detects any edited, deleted, inserted or reordered record and names the "
                    "first bad one. With --public-key every signed checkpoint must verify "
                    "and match the chain, and every record must be covered by one (a log "
                    "rewritten with recomputed hashes fails). With --anchors the log must "
                    "still hold every anchored head.",
    )
    examples(verify, "medvision audit verify --audit-log audit.sqlite --public-key "
                     "keys/audit-signing.pub --anchors /mnt/worm/medvision-anchors",
             "medvision audit verify --json")
    verify.add_argument("--audit-log", "--log", dest="log", type=Path, default=None,
                        help="audit log (SQLite); default as for the commands that write it")
    verify.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    verify.add_argument("--public-key", type=Path, help="audit-signing.pub from 'audit keygen'")
    verify.add_argument("--anchors", type=Path, metavar="DIR",
                        help="folder of anchored checkpoints ('audit anchor --to DIR')")
    verify.set_defaults(run=run)
    anchor = actions.add_parser(
        "anchor", help="copy the latest signed head to a second place",
        description="Writes the log's latest signed checkpoint as a new file in DIR (never "
                    "overwriting one). Put DIR on storage the log's writer cannot change "
                    "(another machine, write-once or object-locked storage): then even a "
                    "holder of the signing key cannot rewrite or truncate what was anchored.")
    anchor.add_argument("--audit-log", "--log", dest="log", type=Path, default=None,
                        help="audit log (SQLite)")
    anchor.add_argument("--to", type=Path, required=True, metavar="DIR", help="anchor folder")
    anchor.add_argument("--public-key", type=Path,
                        help="verify the whole log with this key before anchoring")
    examples(anchor, "medvision audit anchor --audit-log audit.sqlite --to /mnt/worm/anchors "
                     "--public-key keys/audit-signing.pub")
    anchor.set_defaults(run=run)
    report = actions.add_parser("report", help="write an audit report")
    report.add_argument("--audit-log", "--log", dest="log", type=Path, default=None,
                        help="audit log (SQLite)")
    report.add_argument("--public-key", type=Path, help="also verify the signatures")
    report.add_argument("--since", type=_when, help="ISO date or time (UTC), inclusive")
    report.add_argument("--until", type=_when, help="ISO date or time (UTC), exclusive")
    report.add_argument("--format", choices=["html", "csv", "json"], default=None,
                        help="default: from the output's extension, else html")
    report.add_argument("-o", "--output", type=Path, required=True,
                        help="report file, or - for standard output")
    report.add_argument("--force", action="store_true", help="overwrite the report file")
    examples(report, "medvision audit report --audit-log audit.sqlite -o audit.html",
             "medvision audit report --since 2026-11-01 --format json -o -")
    report.add_argument("--tracking", metavar="URI",
                        help="also look every weights digest up in this MLflow tracker "
                             "(default $MLFLOW_TRACKING_URI when set): the registered model "
                             "version and the training runs behind it")
    report.set_defaults(run=run)
    trace = actions.add_parser(
        "trace", help="from a weights digest to the runs that made it (MLflow)",
        description="Looks the SHA-256 of a model's weights (as every report and audit "
                    "record carries it) up in the MLflow Model Registry: the registered "
                    "model versions tagged with it, and for each the training runs with "
                    "their parameters, data fingerprint and metrics; and counts the audit "
                    "records made with those weights.")
    trace.add_argument("weights_sha256", metavar="SHA256",
                       help="the weights digest (a report's pipeline.weights_sha256)")
    trace.add_argument("--tracking", metavar="URI",
                       help="the MLflow tracker (default $MLFLOW_TRACKING_URI)")
    trace.add_argument("--audit-log", "--log", dest="log", type=Path, default=None,
                       help="audit log (SQLite)")
    trace.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    examples(trace, "medvision audit trace 3f2a...e9 --tracking http://mlflow.hospital:5000")
    trace.set_defaults(run=run)


def _verified_text(result: Any) -> str:
    if not result.ok:
        return f"BROKEN at record {result.first_bad}: {result.problem}"
    text = "intact"
    if result.checkpoints:
        text += f", {result.checkpoints} signed checkpoint(s) verified"
    if result.anchors:
        text += f", consistent with {result.anchors} anchor(s)"
    return text


def run(args: argparse.Namespace) -> int:
    """Generate keys, verify, anchor or report."""
    from medvision.audit.log import AuditLog
    from medvision.audit.signing import Verifier, keygen, read_anchors, write_anchor
    from medvision.report.audit import audit_summary, render_csv, render_html, select_records

    if args.audit_action == "keygen":
        private, public = keygen(args.directory)
        print(f"wrote {private} (private, mode 0600: keep it apart from the log) and {public}")
        return 0
    if args.audit_action == "trace":
        return _trace(args)
    log = AuditLog(args.log or default_log_path())
    verifier = Verifier.from_file(args.public_key) if args.public_key else None
    anchors = read_anchors(args.anchors) if getattr(args, "anchors", None) else []
    result = log.verify(verifier=verifier, anchors=anchors)
    verified = _verified_text(result)
    if args.audit_action == "verify":
        if args.json:
            print(json.dumps({"log": str(log.path), "ok": result.ok, "records": result.records,
                              "first_bad": result.first_bad, "problem": result.problem,
                              "checkpoints": result.checkpoints, "anchors": result.anchors,
                              "notes": list(result.notes)}, indent=2))
            return 0 if result.ok else 1
        print(f"{log.path}: {result.records} records, chain {verified}")
        for note in result.notes:
            print(f"  note: {note}")
        return 0 if result.ok else 1
    if args.audit_action == "anchor":
        if not result.ok:
            raise AuditError(f"{log.path}: not anchoring a log that fails verification "
                             f"({verified})")
        checkpoint = log.latest_checkpoint()
        if checkpoint is None:
            raise AuditError(f"{log.path}: no signed checkpoint to anchor; write the log with "
                             "--signing-key")
        path = write_anchor(checkpoint, args.to)
        print(f"anchored record {checkpoint.seq} ({checkpoint.hash[:16]}...) in {path}")
        return 0
    to_stdout = str(args.output) == "-"
    if not to_stdout and args.output.exists() and not args.force:
        raise AuditError(f"{args.output} exists; pass --force to overwrite")
    if args.format is None:
        suffix = args.output.suffix.lower().lstrip(".")
        args.format = {"htm": "html", "html": "html", "csv": "csv", "json": "json"}.get(
            suffix, "html")
    records = select_records(log.records(), since=args.since, until=args.until)
    if args.format == "csv":
        text = render_csv(records)
    else:
        summary = audit_summary(records)
        summary["verification"] = verified
        uri = args.tracking or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            summary["tracking_uri"] = uri
            summary["tracked"] = _tracked(uri, records)
        text = json.dumps(summary, indent=2) if args.format == "json" else \
            render_html(summary, verified=verified)
    if to_stdout:
        sys.stdout.write(text)
        return 0 if result.ok else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(records)} records; chain {verified})")
    return 0 if result.ok else 1


def _tracking_uri(args: argparse.Namespace) -> str:
    from medvision.errors import ConfigError

    uri = args.tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no tracker configured: pass --tracking URI (the MLflow server "
                          "the runs were tracked in) or set MLFLOW_TRACKING_URI")
    return str(uri)


def _digests(records: list[dict[str, Any]]) -> list[str]:
    found = [str((r.get("pipeline") or {}).get("weights_sha256") or r.get("weights_sha256")
                 or "") for r in records]
    return [d for d in dict.fromkeys(found) if d and d != "None"]


def _tracked(uri: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each weights digest of ``records`` and what the registry at ``uri`` holds for it."""
    from medvision.tracking import registered_versions

    out: dict[str, Any] = {}
    for digest in _digests(records):
        try:
            out[digest] = registered_versions(uri, digest)
        except Exception as e:  # noqa: BLE001 - the report is written without the link
            out[digest] = [{"error": f"tracker not reached ({str(e).splitlines()[0][:120]})"}]
    return out


def _trace(args: argparse.Namespace) -> int:
    """``audit trace SHA256``: the registered versions and runs of a weights digest."""
    from medvision.audit.log import AuditLog
    from medvision.tracking import registered_versions

    uri = _tracking_uri(args)
    digest = args.weights_sha256.strip().lower()
    versions = registered_versions(uri, digest)
    log_path = args.log or default_log_path()
    records = 0
    if Path(log_path).is_file():
        records = sum(1 for r in AuditLog(log_path).records() if digest in _digests([r]))
    if args.json:
        print(json.dumps({"weights_sha256": digest, "tracking_uri": uri,
                          "audit_records": records, "versions": versions}, indent=2))
        return 0 if versions else 1
    if not versions:
        print(f"{digest}: no model version in {uri} is tagged with these weights "
              f"({records} audit record(s) made with them)")
        return 1
    for version in versions:
        print(f"{version['model']} version {version['version']} (weights {digest[:16]}...): "
              f"{version['source']}")
        for run in version["runs"]:
            if "error" in run:
                print(f"  run {run['run_id']}: {run['error']}")
                continue
            tags = run["tags"]
            print(f"  run {run['run_id']} ({run['name']}, {run['status']})"
                  + (f" {run['url']}" if run.get("url") else ""))
            print(f"    pipeline {tags.get('medvision.pipeline')} "
                  f"{tags.get('medvision.pipeline_version')}, config "
                  f"{str(tags.get('medvision.config_hash'))[:16]}..., data "
                  f"{str(tags.get('medvision.data_fingerprint'))[:16]}..., "
                  f"{len(run['params'])} parameters")
            best = {k: v for k, v in run["metrics"].items() if k.startswith(("best_", "eval_"))}
            if best:
                print("    " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(best.items())[:8]))
    print(f"{records} audit record(s) in {log_path} were made with these weights")
    return 0
