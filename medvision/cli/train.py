"""``medvision train PIPELINE --data DIR -o RUN_DIR``: train a pipeline's model."""

from __future__ import annotations

import argparse
from typing import Any

from medvision.config import load_pipeline

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``train``."""
    parser = subparsers.add_parser(
        "train", help="train a pipeline's model on labelled data",
        description="Train from a pipeline file. Checkpoints after every epoch; --resume "
                    "continues an interrupted run; the best epoch by the validation metric is "
                    "kept as best.safetensors; per-epoch metrics go to metrics.csv.")
    parser.add_argument("pipeline", help="pipeline name (under pipelines/) or path")
    parser.add_argument("--data", required=True,
                        help="data folder (class folders, or images/ + labels/) or .npz file")
    parser.add_argument("-o", "--output", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--init-from", help="safetensors weights to start from")
    parser.add_argument("--freeze", nargs="*", default=[],
                        help="parameter-name prefixes to keep fixed (with --init-from)")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--limit", type=int,
                        help="use at most this many training and validation items (smoke runs)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; prints the best epoch and metric."""
    from medvision.train import DataSplit, discover_items, split_items, train

    pipeline = load_pipeline(args.pipeline)
    if args.epochs:
        pipeline = pipeline.model_copy(
            update={"training": pipeline.training.model_copy(update={"epochs": args.epochs})})
    if pipeline.data.layout == "npz":
        split = DataSplit(train=tuple(discover_items(pipeline, args.data, split="train")),
                          val=tuple(discover_items(pipeline, args.data, split="val")))
    else:
        split = split_items(pipeline, discover_items(pipeline, args.data))
    if args.limit:
        split = DataSplit(train=_spread(split.train, args.limit), val=_spread(split.val, args.limit))
    result = train(pipeline, split, args.output, resume=args.resume, init_from=args.init_from,
                   freeze=tuple(args.freeze))
    print(f"trained {result.epochs_run} epoch(s) in {result.seconds:.0f} s; best epoch "
          f"{result.best_epoch}: {pipeline.validation_metric} {result.best_metric:.4f}; "
          f"weights in {result.run_dir / 'best.safetensors'}")
    return 0


def _spread(items: tuple[dict[str, Any], ...], limit: int) -> tuple[dict[str, Any], ...]:
    """Up to ``limit`` items taken evenly across the list (so every class is kept)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return tuple(items[int(i * step)] for i in range(limit))
