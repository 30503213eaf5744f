"""``medvision analyze INPUT... --pipeline NAME -o OUT``: batch diagnosis with saliency maps."""

from __future__ import annotations

import argparse
from typing import Any

from medvision.cli.audit_options import add_audit_arguments, auditor_from_args
from medvision.cli.conventions import add_device_argument, add_precision_argument
from medvision.vocabulary import EXPLANATION_METHODS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``analyze``."""
    parser = subparsers.add_parser(
        "analyze", help="analyze studies: prediction, saliency map and report for each",
        description="For every study found under the inputs (DICOM studies, NIfTI, PNG/JPEG), "
                    "write OUT/<study>/report.json, report.html, the saliency map (and mask) "
                    "as NIfTI in the input's geometry, and PNG overlays; then OUT/summary.csv "
                    "and summary.html. A study is ok, flagged (a result that may not apply: "
                    "out of distribution or a result-relevant QC warning), rejected or failed. "
                    "A study whose report matches this run (pipeline, weights, options, "
                    "inputs) is skipped; one made differently is analysed again. "
                    "Exit code: 0 when every study is ok or flagged, 1 when any is rejected, "
                    "failed or in conflict (and flagged, with --fail-on flagged), 2 for a "
                    "usage or configuration error.",
        epilog="examples:\n  medvision analyze scans/ --pipeline chest-xray-pneumonia -o out\n"
               "  medvision analyze mr_series/ --pipeline hippocampus-seg -o out --dicom\n"
               "  medvision analyze scans/ --pipeline chest-xray-pneumonia -o out "
               "--fail-on flagged",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--pipeline", required=True, help="pipeline name or path")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--weights", help="weights to use instead of the pipeline's")
    parser.add_argument("--explain", choices=EXPLANATION_METHODS, help="override the saliency method")
    parser.add_argument("--explain-layer", metavar="MODULE",
                        help="GradCAM/LayerCAM: the layer to explain at instead of the "
                             "pipeline's (e.g. layer3 for maps twice as fine as layer4)")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="what runs the predictions (onnx: needs 'medvision export')")
    parser.add_argument("--faithfulness", action="store_true",
                        help="also compute a deletion-curve faithfulness score per study")
    parser.add_argument("--force", action="store_true",
                        help="redo every study, even those whose report matches this run")
    parser.add_argument("--no-overwrite", action="store_true",
                        help="keep an existing report made differently (other pipeline, "
                             "weights, method, backend, options or inputs) and report the "
                             "study as a conflict instead of analysing it again")
    parser.add_argument("--json", action="store_true",
                        help="the tally and one row per study as JSON on stdout (logs stay on "
                             "stderr)")
    parser.add_argument("--fail-on", choices=["flagged"], action="append", default=[],
                        help="also count flagged studies as failures in the exit code")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run the studies on a Dask distributed cluster (default: here)")
    parser.add_argument("--dicom", nargs="?", const="", default=None, metavar="DIR",
                        help="also write standard DICOM results for DICOM inputs (an SR; for "
                             "series a SEG of the mask and a Parametric Map of the saliency; "
                             "overlay images) into OUT/<study>/dicom/, and copy them to "
                             "DIR/<study>/ when DIR is given")
    parser.add_argument("--fhir", action="store_true",
                        help="also write OUT/<study>/fhir.json: a FHIR R4 Bundle "
                             "(DiagnosticReport, Observations, ImagingStudy, Device) with a "
                             "pseudonymous subject (needs medvision[fhir])")
    parser.add_argument("--include-phi", action="store_true",
                        help="write patient name, ID and birth date into report.json (off: "
                             "reports, logs and audit records carry pseudonyms only)")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="studies per forward pass (and per batched saliency pass); "
                             "default 8")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes reading and preprocessing studies ahead of the model "
                             "(default: up to 4, one per core; 0 reads in this process)")
    add_audit_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Analyze; print a one-line tally and where the summary is."""
    from pathlib import Path

    from medvision.analyze import AnalyzeOptions, analyze
    from medvision.infer import LazyPredictor

    auditor = auditor_from_args(args)
    options = AnalyzeOptions(
        explain_method=args.explain, explain_layer=args.explain_layer,
        faithfulness=args.faithfulness, force=args.force,
        overwrite=not args.no_overwrite, include_phi=args.include_phi,
        dicom=args.dicom is not None, fhir=args.fhir, batch_size=max(1, args.batch_size),
        workers=args.workers, device=args.device)

    # the networks are built only when a study needs them
    predictor = LazyPredictor.from_pipeline(args.pipeline, weights=args.weights,
                                            search=args.pipelines_dir, backend=args.backend,
                                            # with --scheduler the workers' device counts
                                            device="cpu" if args.scheduler else args.device,
                                            precision=args.precision)
    results = analyze(args.inputs, predictor, args.output, auditor=auditor, options=options,
                      scheduler=args.scheduler)
    if args.dicom:
        import shutil

        for result in results:
            if (result.folder / "dicom").is_dir():
                shutil.copytree(result.folder / "dicom", Path(args.dicom) / result.study,
                                dirs_exist_ok=True)
    counts = {status: sum(r.status == status for r in results)
              for status in ("ok", "flagged", "rejected", "failed", "conflict")}
    failing = {"rejected", "failed", "conflict"} | set(args.fail_on)
    code = 1 if any(r.status in failing for r in results) else 0
    if args.json:
        import json

        print(json.dumps({
            "counts": counts, "summary": str(Path(args.output) / "summary.html"),
            "studies": [{"study": r.study, "status": r.status, "reason": r.reason,
                         "label": r.label, "scores": r.scores, "qc": r.qc,
                         "folder": str(r.folder), "skipped": r.skipped, "replaced": r.replaced}
                        for r in results]}, indent=2))
        return code
    skipped = sum(r.skipped and r.status != "conflict" for r in results)
    replaced = sum(r.replaced for r in results)
    notes = [f"{skipped} unchanged, skipped" if skipped else "",
             f"{replaced} re-analysed, replacing older reports" if replaced else ""]
    print(f"{len(results)} {'study' if len(results) == 1 else 'studies'}: " + ", ".join(
        f"{n} {status}" for status, n in counts.items() if n or status in ("ok", "rejected",
                                                                           "failed"))
          + "".join(f" ({note})" for note in notes if note))
    for result in results:
        if result.status != "ok":
            print(f"  {result.study}: {result.status}: {result.reason}")
    print(f"summary: {Path(args.output) / 'summary.html'}")
    return code
