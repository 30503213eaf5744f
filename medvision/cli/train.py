"""``medvision train PIPELINE --data DIR -o RUN_DIR``: train a pipeline's model."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from medvision.cli.audit_options import add_audit_arguments, auditor_from_args
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
    """Register ``train``."""
    parser = subparsers.add_parser(
        "train", help="train a pipeline's model on labelled data",
        description="Train from a pipeline file. Checkpoints after every epoch; --resume "
                    "continues an interrupted run; the best epoch by the validation metric is "
                    "kept as best.safetensors; per-epoch metrics go to metrics.csv.")
    add_pipeline_argument(parser, what="the pipeline to train")
    parser.add_argument("--data", required=True,
                        help="data folder (class folders, or images/ + labels/) or .npz file")
    parser.add_argument("-o", "--output", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--init-from", help="safetensors weights to start from (every tensor "
                        "skipped or converted is named, and listed in RUN/init.json)")
    parser.add_argument("--rgb-to-grey", action="store_true",
                        help="with --init-from: sum a colour first convolution over colour to "
                             "fit a 1-channel model")
    parser.add_argument("--freeze", nargs="*", default=[],
                        help="parameter-name prefixes to keep fixed (with --init-from)")
    parser.add_argument("--fold", type=int, metavar="I",
                        help="cross-validation: train on every fold but I (from 0) and validate "
                             "on I (needs training.folds); --resume with the same --fold")
    parser.add_argument("--member", type=int, metavar="I",
                        help="an architecture ensemble: train member I (from 1; 0 is the "
                             "pipeline's own model), its network and training settings from "
                             "the pipeline's members list, on the same split")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after the epoch that passes this many minutes of training")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        help="override training.precision (float16: GPUs only)")
    add_device_argument(parser)
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train with DistributedDataParallel in N processes on this "
                             "machine (through torchrun; one GPU each with --device cuda, "
                             "gloo on CPUs); training.batch_size is the global batch")
    parser.add_argument("--limit", type=int,
                        help="use at most this many training and validation items (smoke runs)")
    add_tracking_argument(parser)
    add_audit_arguments(parser)
    examples(parser, 'medvision train --pipeline chest-xray-pneumonia --data ../shared/data/chest_xray/train -o runs/chest', 'medvision train --pipeline chest-xray-pneumonia --data DATA -o runs/chest --resume', 'medvision train --pipeline hippocampus-seg --data DATA -o runs/hippo --tracking http://127.0.0.1:5000 --tracking tensorboard')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; prints the best epoch and metric."""
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args.nproc, args.argv)
    from medvision.config import load_pipeline
    from medvision.train import DataSplit, pipeline_split, train

    pipeline = load_pipeline(pipeline_of(args), search=args.pipelines_dir)
    if args.resume:
        _same_member(pipeline, Path(args.output), args.member or 0)
    if args.member or pipeline.members:
        pipeline = pipeline.member(args.member or 0)
    if args.epochs:
        # Averaging needs at least one ordinary epoch before it; a short override keeps that.
        swa = min(pipeline.training.swa_epochs, args.epochs - 1)
        pipeline = pipeline.model_copy(update={"training": pipeline.training.model_copy(
            update={"epochs": args.epochs, "swa_epochs": swa})})
    if args.precision:
        pipeline = pipeline.model_copy(update={"training": pipeline.training.model_copy(
            update={"precision": args.precision})})
    if pipeline.task == "detection":
        return _run_detection(args, pipeline)
    split = pipeline_split(pipeline, args.data, fold=args.fold)
    if args.limit:
        split = DataSplit(train=_spread(split.train, args.limit),
                          val=_spread(split.val, args.limit), fold=split.fold)
    result = train(pipeline, split, args.output, resume=args.resume,
                   init_from=args.init_from, freeze=tuple(args.freeze),
                   auditor=auditor_from_args(args), rgb_to_grey=args.rgb_to_grey,
                   device=args.device, max_minutes=args.max_minutes,
                   tracking=args.tracking, options=options_of(args),
                   progress=False if args.quiet else None)
    if result.averaged_epochs:  # best.safetensors is the weight average, not one epoch
        chosen = (f"weights averaged over the last {result.averaged_epochs} epoch(s): "
                  f"{pipeline.validation_metric} {result.best_metric:.4f} (best single epoch "
                  f"{result.best_epoch} kept as best_epoch.safetensors)")
    else:
        chosen = (f"best epoch {result.best_epoch}: {pipeline.validation_metric} "
                  f"{result.best_metric:.4f}")
    fold = "" if args.fold is None else f"fold {args.fold} of {pipeline.training.folds}: "
    if args.member:
        fold = f"member {args.member} ({pipeline.model.name}): "
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 alone reports
    where = f" on {result.device['device']} ({result.device['name']})" if result.device else ""
    print(f"{fold}trained {result.epochs_run} epoch(s) in {result.seconds:.0f} s{where}; "
          f"{chosen}; weights in {result.run_dir / 'best.safetensors'}")
    for key in ("mlflow_run_url", "mlflow_run_id", "tensorboard_dir"):
        if result.tracking and key in result.tracking:
            print(f"tracked: {key.replace('_', ' ')} {result.tracking[key]}")
    if result.skipped:
        print(f"{len(result.skipped)} unreadable item(s) skipped (see "
              f"{result.run_dir / 'skipped.json'}):")
        for path, reason in result.skipped[:10]:
            print(f"  {path}: {reason}")
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command in ``nproc`` processes under torchrun (PyTorch's launcher: it
    sets the ranks and the rendezvous; medvision spawns nothing itself)."""
    import subprocess

    cleaned: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        cleaned.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "medvision", *cleaned]
    return subprocess.call(command)


def _same_member(pipeline: Any, run: Path, member: int) -> None:
    """A run of an architecture ensemble resumes as the member it started as."""
    from medvision.config import load_pipeline
    from medvision.errors import ConfigError

    if not pipeline.members or not (run / "pipeline.yaml").is_file():
        return
    started = pipeline.member_index(load_pipeline(run / "pipeline.yaml").model)
    if started is not None and started != member:
        raise ConfigError(f"{run}: this run trains member {started}; resume it "
                          + (f"with --member {started}" if started else "without --member"))


def _spread(items: tuple[dict[str, Any], ...], limit: int) -> tuple[dict[str, Any], ...]:
    """Up to ``limit`` items taken evenly across the list (so every class is kept)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return tuple(items[int(i * step)] for i in range(limit))


def _run_detection(args: argparse.Namespace, pipeline: Any) -> int:
    """Train a detection pipeline (official train/val split when the data has one)."""
    from medvision.audit.records import record_run
    from medvision.errors import DataError, MedvisionError
    from medvision.train.boxes import detection_items
    from medvision.train.detection import train_detection

    try:
        train_items = detection_items(pipeline, args.data, split="train")
        val_items = detection_items(pipeline, args.data, split="val")
    except DataError:
        from medvision.train import split_items

        split = split_items(pipeline, detection_items(pipeline, args.data))
        train_items, val_items = list(split.train), list(split.val)
    if args.limit:
        train_items = list(_spread(tuple(train_items), args.limit))
        val_items = list(_spread(tuple(val_items), args.limit))
    auditor = auditor_from_args(args)
    started = time.perf_counter()
    inputs = {"train": {"images": len(train_items)}, "val": {"images": len(val_items)}}
    try:
        result = train_detection(pipeline, train_items, val_items, args.output,
                                 resume=args.resume, device=args.device,
                                 max_minutes=args.max_minutes, tracking=args.tracking,
                                 options=options_of(args),
                                 progress=False if args.quiet else None)
    except MedvisionError as e:
        record_run(auditor, action="train", status="failed", pipeline=pipeline, inputs=inputs,
                   outputs=[], result={}, seconds=time.perf_counter() - started, reason=str(e))
        raise
    run = Path(args.output)
    record_run(auditor, action="train", status="ok", pipeline=pipeline, inputs=inputs,
               outputs=[run / n for n in ("best.safetensors", "metrics.csv", "pipeline.yaml")],
               result={"epochs": result.epochs_run, "best_epoch": result.best_epoch,
                       "map_50": result.best_metric}, seconds=time.perf_counter() - started)
    print(f"trained {result.epochs_run} epoch(s) in {result.seconds:.0f} s; best epoch "
          f"{result.best_epoch}: val mAP@0.5 {result.best_metric:.4f}; weights in "
          f"{run / 'best.safetensors'}")
    return 0
