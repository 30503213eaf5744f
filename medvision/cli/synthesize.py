"""``medvision synthesize train|sample``: a class-conditional generator of a pipeline's images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medvision.cli.conventions import add_pipeline_argument, examples, pipeline_of

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``synthesize``."""
    parser = subparsers.add_parser(
        "synthesize", help="train a class-conditional diffusion model and sample labelled "
                           "synthetic images",
        description="A pixel-space diffusion model (MONAI DiffusionModelUNet, DDPM training, "
                    "DDIM sampling) of a classification pipeline's training images, from its "
                    "`generative:` settings. Sampled images carry `synthetic: true` in a "
                    "sidecar and in the PNG itself.")
    actions = parser.add_subparsers(dest="synthesize_action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train the generator (resumable)")
    add_pipeline_argument(train, what="the pipeline whose images to model")
    train.add_argument("--data", required=True, help="the labelled training folder or .npz")
    train.add_argument("-o", "--output", required=True, type=Path, help="run folder")
    train.add_argument("--resume", action="store_true")
    train.add_argument("--max-minutes", type=float,
                       help="stop after the epoch that passes this many minutes")
    train.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs)")
    train.add_argument("--classes", nargs="+", help="train on these classes only")
    sample = actions.add_parser("sample", help="sample N images per class with provenance")
    add_pipeline_argument(sample, what="the pipeline the generator was trained for")
    sample.add_argument("--generator", required=True, type=Path, help="generator run folder")
    sample.add_argument("-o", "--output", required=True, type=Path,
                        help="class-folder output (OUT/<class>/synthetic-*.png)")
    sample.add_argument("--per-class", type=int, required=True)
    sample.add_argument("--classes", nargs="+", help="only these classes")
    sample.add_argument("--seed", type=int, default=0)
    examples(train, "medvision synthesize train chest-xray-pneumonia --data "
                    "../shared/data/chest_xray/train -o runs/chest-gen --max-minutes 50")
    examples(sample, "medvision synthesize sample chest-xray-pneumonia --generator "
                     "runs/chest-gen -o synthetic/ --per-class 500 --classes NORMAL")
    for sub in (train, sample):
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train or sample."""
    from medvision.config import load_pipeline
    from medvision.train import pipeline_split
    from medvision.train.synthesize import sample, train_generator

    pipeline = load_pipeline(pipeline_of(args), search=args.pipelines_dir)
    if args.synthesize_action == "train":
        split = pipeline_split(pipeline, args.data)  # the generator sees training items only
        items = list(split.train)
        if args.classes:
            wanted = {pipeline.classes.index(c) for c in args.classes}
            items = [i for i in items if int(i["label"]) in wanted]
        result = train_generator(pipeline, items, args.output, resume=args.resume,
                                 max_minutes=args.max_minutes, max_steps=args.max_steps)
        print(f"generator: {result.epochs_run} epoch(s), {result.steps} step(s) in "
              f"{result.seconds:.0f} s; loss {result.loss:.4f}; in {result.run_dir}")
        return 0
    files = sample(pipeline, args.generator, args.output, per_class=args.per_class,
                   seed=args.seed, classes=args.classes)
    print(f"wrote {len(files)} synthetic image(s) under {args.output}")
    return 0
