"""``medvision plan DATA --budget-minutes N -o FILE``: a pipeline file planned for the data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medvision.cli.conventions import (
    add_device_argument,
    add_tracking_argument,
    examples,
    options_of,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``plan``."""
    parser = subparsers.add_parser(
        "plan", help="inspect a dataset and write a pipeline file that trains in a time budget",
        description="Fingerprints the data (layout, classes and balance, sizes, spacings, "
                    "channels, intensities, the patient key in file names, duplicate files), "
                    "chooses preprocessing, network and augmentation, measures a few training "
                    "steps on this machine and sets the epochs that fit the budget. The "
                    "fingerprint, the timings and the reasoning are comments in the file.")
    parser.add_argument("data", type=Path, help="a class-folder, images/labels, VOC, COCO, "
                                                "boxes.csv folder or an .npz file")
    parser.add_argument("--task", choices=["classification", "segmentation", "detection"],
                        help="checked against the layout (default: the layout's)")
    parser.add_argument("--budget-minutes", type=float, required=True,
                        help="wall-clock minutes training may take on this machine")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="a pipeline file (.yaml) or a folder to write pipeline.yaml into")
    parser.add_argument("--name", help="pipeline name (default: the output folder's name)")
    parser.add_argument("--sample", type=int, default=64,
                        help="images read for the fingerprint (default 64)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    add_device_argument(parser)
    add_tracking_argument(parser)
    examples(parser, "medvision plan ../shared/data/chest_xray/train --task classification "
                     "--budget-minutes 60 -o pipelines/my-chest")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Plan and write the file; prints where and the headline choices."""
    import re

    from medvision.errors import ConfigError
    from medvision.tracking import parse_targets
    from medvision.train.plan import plan_pipeline

    targets = parse_targets(args.tracking)  # a missing extra fails before the work

    target = args.output if args.output.suffix in (".yaml", ".yml") else \
        args.output / "pipeline.yaml"
    if target.exists() and not args.force:
        raise ConfigError(f"{target}: exists; pass --force to overwrite")
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", (
        target.parent.name if target.name == "pipeline.yaml" else target.stem).lower()
    ).strip("-") or "planned"
    plan = plan_pipeline(args.data, budget_minutes=args.budget_minutes, task=args.task,
                         name=name, sample=args.sample, device=args.device)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(plan.yaml())
    if targets:
        _track(targets, plan, target, name, options_of(args))
    training = plan.settings["training"]
    print(f"wrote {target}: {plan.settings['task']}, {plan.settings['model']['name']} at "
          f"{plan.settings['preprocess']['size']}, {training['epochs']} epoch(s) of batch "
          f"{training['batch_size']} (about {plan.timing['epoch_estimate']:.0f} s each here)")
    return 0


def _track(targets: Any, plan: Any, target: Path, name: str, options: dict[str, Any]) -> None:
    """The plan as a tracked run: the planned settings as parameters, the fingerprint as
    tags, the timings as metrics, the pipeline file as an artifact."""
    import dataclasses

    from medvision._version import __version__
    from medvision.tracking import Tracker, flatten

    fingerprint = dataclasses.asdict(plan.fingerprint)
    tracker = Tracker.open(targets, folder=None, experiment=name, run_name=f"plan {name}",
                           tags={"medvision.kind": "plan", "medvision.version": __version__,
                                 "medvision.pipeline": name,
                                 **{f"medvision.data.{k}": v for k, v in
                                    flatten(fingerprint).items()}})
    tracker.log_params({**flatten(plan.settings),
                        **{f"cli.{k}": v for k, v in options.items()}})
    tracker.log_metrics({f"timing.{k}": v for k, v in plan.timing.items()})
    tracker.log_artifacts([target])
    tracker.finish()
    for key, value in tracker.links().items():
        print(f"tracked: {key.replace('_', ' ')} {value}")
