"""``medvision publish RUN_DIR --pipeline NAME --data DIR``: ship a trained run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``publish``."""
    parser = subparsers.add_parser(
        "publish", help="copy a run's best weights into a pipeline folder and fit its OOD guard",
        description="Copies best.safetensors (as model.safetensors) and calibration.json into "
                    "the pipeline folder and fits the out-of-distribution guard on the run's "
                    "training split (threshold from its validation split).")
    parser.add_argument("run_dir", help="a training run folder")
    parser.add_argument("--pipeline", required=True, help="pipeline name or folder to ship into")
    parser.add_argument("--data", help="the training data (to fit the OOD guard)")
    examples(parser, 'medvision publish runs/chest --pipeline chest-xray-pneumonia --data DATA')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Publish and print the summary as JSON."""
    from medvision.config import load_pipeline, pipeline_dir
    from medvision.train import DataSplit, discover_items, split_items
    from medvision.train.publish import publish

    folder = pipeline_dir(args.pipeline, search=args.pipelines_dir)
    split = None
    if args.data:
        pipeline = load_pipeline(folder)
        if pipeline.task == "detection":
            split = None  # detection pipelines have no feature-distance guard yet
        elif pipeline.data.layout == "npz":
            split = DataSplit(train=tuple(discover_items(pipeline, args.data, split="train")),
                              val=tuple(discover_items(pipeline, args.data, split="val")))
        else:
            split = split_items(pipeline, discover_items(pipeline, args.data))
    print(json.dumps(publish(args.run_dir, folder, split=split), indent=2))
    return 0
