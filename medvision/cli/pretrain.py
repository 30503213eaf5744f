"""``medvision pretrain PIPELINE --data DIR -o RUN``: self-supervised pretraining."""

from __future__ import annotations

import argparse
from typing import Any

from medvision.cli.conventions import (
    add_device_argument,
    add_pipeline_argument,
    add_tracking_argument,
    examples,
    options_of,
    pipeline_of,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``pretrain``."""
    parser = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining on unlabelled images (no internet)",
        description="Trains the pipeline's network on the images under --data without their "
                    "labels: contrastive (SimCLR views, NT-Xent) for classification networks, "
                    "masked reconstruction for segmentation networks. Writes "
                    "RUN/pretrained.safetensors for 'train --init-from'. Checkpoints every "
                    "epoch; --resume continues.")
    add_pipeline_argument(parser, what="the pipeline whose network to pretrain")
    parser.add_argument("--data", required=True,
                        help="a folder of images (searched recursively; labels/ is skipped)")
    parser.add_argument("-o", "--output", required=True, help="run folder")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-minutes", type=float,
                        help="stop after the epoch that passes this many minutes")
    parser.add_argument("--method", choices=["contrastive", "masked"],
                        help="default: contrastive for classification, masked for segmentation")
    parser.add_argument("--batch-size", type=int, help="default: training.batch_size")
    parser.add_argument("--limit", type=int, help="use at most this many images (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    add_device_argument(parser)
    add_tracking_argument(parser)
    examples(parser, "medvision pretrain chest-xray-pneumonia --data ../shared/data/chest_xray/"
                     "train -o runs/chest-ssl --max-minutes 30",
             "medvision train chest-xray-pneumonia --data DATA -o runs/chest --init-from "
             "runs/chest-ssl/pretrained.safetensors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Pretrain; prints the final loss and where the weights are."""
    from medvision.config import load_pipeline
    from medvision.train.pretrain import PRETRAINED_FILE, pretrain, unlabelled_images

    pipeline = load_pipeline(pipeline_of(args), search=args.pipelines_dir)
    images = unlabelled_images(pipeline, args.data)
    if args.limit:
        step = max(1, len(images) // args.limit)
        images = images[::step][: args.limit]
    result = pretrain(pipeline, images, args.output, epochs=args.epochs, method=args.method,
                      max_minutes=args.max_minutes, resume=args.resume,
                      batch_size=args.batch_size, device=args.device,
                      tracking=args.tracking, options=options_of(args),
                      progress=False if args.quiet else None)
    print(f"pretrained ({result.method}) {result.epochs_run} epoch(s) on {result.images} "
          f"image(s) in {result.seconds:.0f} s; loss {result.loss:.4f}; weights in "
          f"{result.run_dir / PRETRAINED_FILE}")
    return 0
