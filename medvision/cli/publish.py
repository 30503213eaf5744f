"""``medvision publish RUN_DIR [RUN_DIR...] --pipeline NAME --data DIR``: ship a trained run,
or the fold runs of a cross-validation as an ensemble."""

from __future__ import annotations

import argparse
import json
from typing import Any

from medvision.cli.conventions import add_device_argument, add_tracking_argument, examples

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``publish``."""
    parser = subparsers.add_parser(
        "publish", help="copy a run's best weights into a pipeline folder and fit its OOD guard",
        description="Copies best.safetensors (as model.safetensors) and calibration.json into "
                    "the pipeline folder and fits the out-of-distribution guard on the run's "
                    "training split (threshold from its validation split). Several runs ship "
                    "as one ensemble whose calibrated probabilities are averaged at inference: "
                    "the folds of a cross-validation ('train --fold I'; model.safetensors, "
                    "fold-1.safetensors...) or the members of an architecture ensemble "
                    "('train' and 'train --member I'; model.safetensors, member-1.safetensors"
                    "...), listed in ensemble.json.")
    parser.add_argument("run_dir", nargs="+", help="a training run folder (several: the fold "
                                                   "runs of one cross-validation, or the "
                                                   "member runs of an architecture ensemble)")
    parser.add_argument("--pipeline", required=True, help="pipeline name or folder to ship into")
    parser.add_argument("--data", help="the training data (to fit the OOD guard)")
    add_device_argument(parser)
    add_tracking_argument(parser)
    examples(parser, 'medvision publish runs/chest --pipeline chest-xray-pneumonia --data DATA',
             'medvision publish runs/chest-fold0 runs/chest-fold1 runs/chest-fold2 --pipeline '
             'chest-xray-pneumonia --data DATA')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Publish and print the summary as JSON."""
    from medvision.config import load_pipeline, pipeline_dir
    from medvision.tracking import parse_targets
    from medvision.train import pipeline_split
    from medvision.train.publish import publish, publish_ensemble, register_model

    folder = pipeline_dir(args.pipeline, search=args.pipelines_dir)
    targets = parse_targets(args.tracking or load_pipeline(folder).training.tracking)
    ensemble = len(args.run_dir) > 1
    split = None
    if args.data:
        pipeline = load_pipeline(folder)
        if pipeline.task != "detection":  # detection pipelines have no feature guard yet
            # an ensemble's guard belongs to its first member: fold 0's split (a
            # cross-validation) or the pipeline's own split (an architecture ensemble)
            split = pipeline_split(pipeline, args.data,
                                   fold=0 if ensemble and pipeline.training.folds else None)
    if ensemble:
        summary = publish_ensemble(args.run_dir, folder, split=split, device=args.device)
    else:
        summary = publish(args.run_dir[0], folder, split=split, device=args.device)
    if targets:
        summary["registered"] = register_model(targets, folder, args.run_dir, summary)
    print(json.dumps(summary, indent=2))
    return 0
