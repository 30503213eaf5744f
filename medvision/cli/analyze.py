"""``medvision analyze INPUT... --pipeline NAME -o OUT``: batch diagnosis with saliency maps."""

from __future__ import annotations

import argparse
from typing import Any

from medvision.cli.audit_options import add_audit_arguments, auditor_from_args
from medvision.explain import METHODS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``analyze``."""
    parser = subparsers.add_parser(
        "analyze", help="analyze studies: prediction, saliency map and report for each",
        description="For every study found under the inputs (DICOM studies, NIfTI, PNG/JPEG), "
                    "write OUT/<study>/report.json, report.html, the saliency map (and mask) "
                    "as NIfTI in the input's geometry, and PNG overlays; then OUT/summary.csv "
                    "and summary.html. Exit code: the number of studies rejected or failed "
                    "(0 when all succeeded).")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--pipeline", required=True, help="pipeline name or path")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--weights", help="weights to use instead of the pipeline's")
    parser.add_argument("--explain", choices=METHODS, help="override the saliency method")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="what runs the predictions (onnx: needs 'medvision export')")
    parser.add_argument("--faithfulness", action="store_true",
                        help="also compute a deletion-curve faithfulness score per study")
    parser.add_argument("--force", action="store_true", help="redo studies already analysed")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run the studies on a Dask distributed cluster (default: here)")
    parser.add_argument("--include-phi", action="store_true",
                        help="write patient name, ID and birth date into report.json (off: "
                             "reports, logs and audit records carry pseudonyms only)")
    add_audit_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Analyze; print a one-line tally and where the summary is."""
    from pathlib import Path

    from medvision.analyze import AnalyzeOptions, analyze
    from medvision.infer import Predictor

    auditor = auditor_from_args(args)
    predictor = Predictor.from_pipeline(args.pipeline, weights=args.weights,
                                        backend=args.backend)
    results = analyze(args.inputs, predictor, args.output, auditor=auditor, options=AnalyzeOptions(
        explain_method=args.explain, faithfulness=args.faithfulness, force=args.force,
        include_phi=args.include_phi), scheduler=args.scheduler)
    bad = [r for r in results if r.status != "ok"]
    skipped = sum(r.skipped for r in results)
    print(f"{len(results)} studies: {len(results) - len(bad)} ok, "
          f"{sum(r.status == 'rejected' for r in bad)} rejected, "
          f"{sum(r.status == 'failed' for r in bad)} failed"
          + (f" ({skipped} already done, skipped)" if skipped else ""))
    for result in bad:
        print(f"  {result.study}: {result.status}: {result.reason}")
    print(f"summary: {Path(args.output) / 'summary.html'}")
    return min(len(bad), 125)
