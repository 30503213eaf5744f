"""``medvision evaluate PIPELINE --data DIR -o EVAL_DIR``: metrics with CIs, plots, HTML."""

from __future__ import annotations

import argparse
import json
from typing import Any

from medvision.audit.records import items_digest
from medvision.cli.audit_options import add_audit_arguments, auditor_from_args
from medvision.cli.conventions import (
    add_device_argument,
    add_pipeline_argument,
    add_precision_argument,
    add_tracking_argument,
    examples,
    options_of,
    pipeline_of,
)
from medvision.vocabulary import EXPLANATION_METHODS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="score a trained pipeline on labelled data",
        description="Write metrics.json (every scalar with a bootstrap 95% CI), plots and "
                    "summary.html. Uses the pipeline's shipped weights unless --weights is "
                    "given.")
    add_pipeline_argument(parser, what="the pipeline to evaluate")
    parser.add_argument("--data", required=True, help="labelled data folder or .npz file")
    parser.add_argument("-o", "--output", required=True, help="evaluation folder")
    parser.add_argument("--weights", help="safetensors weights (default: the pipeline's)")
    parser.add_argument("--explain", nargs="?", const=0, type=int, metavar="N",
                        help="also score the explanations: share of saliency inside the true "
                             "region (segmentation mask, detection boxes) for the first N "
                             "items (all when N is not given)")
    parser.add_argument("--split", choices=["all", "train", "val", "test"],
                        help="which items: for an .npz file its official split (default test); "
                             "for a folder 'all' (default) or 'train'/'val', the pipeline's "
                             "validation split of that folder (grouped by patient when the "
                             "pipeline has data.group_pattern); a folder has no 'test' split")
    parser.add_argument("--explain-method", choices=EXPLANATION_METHODS,
                        help="with --explain: score this method instead of the pipeline's")
    parser.add_argument("--explain-layer", metavar="MODULE",
                        help="with --explain: GradCAM/LayerCAM at this layer (e.g. layer3)")
    parser.add_argument("--fold", type=int, metavar="I",
                        help="with --split train/val: that side of cross-validation fold I "
                             "(the fold a 'train --fold I' run validated on)")
    parser.add_argument("--out-of-fold", action="store_true",
                        help="a cross-validation ensemble: each member alone on the "
                             "validation side of its own fold, pooled (every case once), with "
                             "per-fold metrics and their spread")
    parser.add_argument("--force", action="store_true", help="overwrite an evaluation")
    parser.add_argument("--json", action="store_true", help="the metrics as JSON on stdout")
    add_device_argument(parser)
    add_precision_argument(parser)
    add_tracking_argument(parser)
    add_audit_arguments(parser)
    examples(parser, 'medvision evaluate --pipeline hippocampus-seg --data ../shared/data/hippocampus --split val -o eval', 'medvision evaluate --pipeline chest-xray-pneumonia --data DATA -o eval --json')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the headline metrics."""
    from medvision.evaluate.run import evaluate, evaluate_out_of_fold
    from medvision.infer import Predictor
    from medvision.train import discover_items, pipeline_split

    predictor = Predictor.from_pipeline(pipeline_of(args), weights=args.weights,
                                        search=args.pipelines_dir, device=args.device,
                                        precision=args.precision)
    pipeline = predictor.pipeline
    from medvision.train.progress import tracking_targets

    targets = tracking_targets(pipeline, args.tracking)  # a missing extra fails first
    if args.out_of_fold:
        from medvision.errors import ConfigError

        if args.split or args.fold is not None or args.explain is not None:
            raise ConfigError("--out-of-fold chooses the items itself: no --split, --fold or "
                              "--explain")
        metrics = evaluate_out_of_fold(predictor, args.data, args.output, force=args.force,
                                       auditor=auditor_from_args(args))
        _track(args, targets, predictor, metrics, None)
        return _print(args, metrics, str(pipeline.task))
    if pipeline.task == "detection":
        from medvision.train.boxes import detection_items

        items = detection_items(pipeline, args.data,
                                split=args.split if args.split in ("train", "val", "test")
                                else None)
    elif args.fold is not None or (args.split in ("train", "val")):
        split = pipeline_split(pipeline, args.data, fold=args.fold)
        items = list(split.train if args.split == "train" else split.val)
    elif pipeline.data.layout == "npz":
        items = discover_items(pipeline, args.data, split=args.split or "test")
    else:
        if args.split == "test":
            from medvision.errors import ConfigError

            raise ConfigError(f"{args.data}: a folder has no official test split; evaluate "
                              "on a separate test folder with --split all (the default)")
        items = discover_items(pipeline, args.data)
    metrics = evaluate(predictor, items, args.output, force=args.force,
                       explain_items=args.explain, explain_method=args.explain_method,
                       explain_layer=args.explain_layer,
                       auditor=auditor_from_args(args),
                       audit_inputs={"data": items_digest(items), "split": args.split,
                                     "weights_sha256": predictor.weights_sha256})
    _track(args, targets, predictor, metrics, items_digest(items))
    return _print(args, metrics, str(pipeline.task))


def _track(args: argparse.Namespace, targets: Any, predictor: Any, metrics: dict[str, Any],
           data: dict[str, Any] | None) -> None:
    """The metrics with their CIs to the tracked run of the weights (or a linked one)."""
    import sys

    from medvision.evaluate.tracking import evaluation_label, track_evaluation

    if not targets:
        return
    label = evaluation_label("out-of-fold" if args.out_of_fold else args.split, args.data)
    links = track_evaluation(targets, pipeline=predictor.pipeline, weights=args.weights,
                             weights_sha256=predictor.weights_sha256, label=label,
                             output=args.output, metrics=metrics, data=data,
                             options=options_of(args))
    for key, value in links.items():  # stdout may be --json's
        print(f"tracked ({label}): {key.replace('_', ' ')} {value}", file=sys.stderr)


def _print(args: argparse.Namespace, metrics: dict[str, Any], task: str) -> int:
    """The headline metrics with their CIs (or all metrics as JSON)."""
    keys = {"classification": ("accuracy", "auc", "f1", "ece"),
            "detection": ("map_50", "map_50_95", "count_mae")}.get(task, ("dice",))
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    parts = [f"{k} {metrics[k]['value']:.4f} [{metrics[k]['ci95'][0]:.4f}, "
             f"{metrics[k]['ci95'][1]:.4f}]" for k in keys]
    print(f"{metrics['n']} cases: " + "; ".join(parts) + f"; see {args.output}/summary.html")
    per_fold = metrics.get("per_fold", {})
    for fold, entry in per_fold.items():
        if isinstance(entry, dict):
            print(f"  {fold} ({entry['n']} cases): " + "; ".join(
                f"{k} {v['value']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]"
                for k, v in entry.items() if isinstance(v, dict)))
    for k in ("accuracy", "auc", "dice"):
        if f"{k}_mean" in per_fold:
            print(f"  fold spread: {k} {per_fold[f'{k}_mean']:.4f} ± {per_fold[f'{k}_sd']:.4f} (SD)")
    return 0
