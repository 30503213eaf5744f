"""``medvision synthesize train|sample|metrics|experiment``: a class-conditional generator of a pipeline's images."""

from __future__ import annotations

import argparse
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
    add_device_argument(train)
    add_tracking_argument(train)
    sample = actions.add_parser("sample", help="sample N images per class with provenance")
    add_pipeline_argument(sample, what="the pipeline the generator was trained for")
    sample.add_argument("--generator", required=True, type=Path, help="generator run folder")
    sample.add_argument("-o", "--output", required=True, type=Path,
                        help="class-folder output (OUT/<class>/synthetic-*.png)")
    sample.add_argument("--per-class", type=int, required=True)
    sample.add_argument("--classes", nargs="+", help="only these classes")
    sample.add_argument("--seed", type=int, default=0)
    add_device_argument(sample)
    metrics = actions.add_parser(
        "metrics", help="quality and memorisation of synthetic images (quality.json, "
                        "memorisation.html)",
        description="Fréchet distance and precision/recall against held-out real images, in "
                    "the feature space of a trained classifier (--features) and of a seeded "
                    "random network; and for every synthetic image its nearest training "
                    "image (pixels and features), flagging likely copies.")
    add_pipeline_argument(metrics, what="the pipeline the generator was trained for")
    metrics.add_argument("--generator", required=True, type=Path,
                         help="generator run folder (its training items are the reference "
                              "for memorisation)")
    metrics.add_argument("--synthetic", required=True, type=Path,
                         help="class folders of synthetic images (synthesize sample -o)")
    metrics.add_argument("--data", required=True,
                         help="the labelled data the generator's split came from")
    metrics.add_argument("-o", "--output", required=True, type=Path)
    _metric_options(metrics)
    experiment = actions.add_parser(
        "experiment", help="train with and without synthetic images of a scarce class and "
                           "compare them with paired bootstrap CIs",
        description="Split (optionally cut the scarce class to a fraction of its training "
                    "patients), train a generator on the training side, sample the scarce "
                    "class up to the largest, train the pipeline without and with the samples "
                    "and compare both on the same held-out items: recall of the scarce class, "
                    "balanced accuracy, AUC, each difference with a paired BCa bootstrap 95% "
                    "CI. Every step is resumable: run the same command again to continue.")
    add_pipeline_argument(experiment, what="the classification pipeline")
    experiment.add_argument("--data", required=True, help="labelled folder or .npz file")
    experiment.add_argument("--scarce", required=True, help="the scarce class")
    experiment.add_argument("--keep-fraction", type=float,
                            help="keep only this share of the scarce class's training "
                                 "patients (make it scarce on purpose)")
    experiment.add_argument("--synthetic-count", type=int,
                            help="synthetic images to add (default: up to the largest class)")
    experiment.add_argument("--generator", type=Path,
                            help="an already trained generator (default: trained in OUT)")
    experiment.add_argument("--generator-classes", nargs="+",
                            help="train the generator on these classes only")
    experiment.add_argument("--generator-minutes", type=float,
                            help="stop generator training after the epoch past this")
    experiment.add_argument("--evaluation", choices=["val", "test"], default="val",
                            help="held-out items: the split's validation side, or an .npz "
                                 "file's official test split")
    experiment.add_argument("-o", "--output", required=True, type=Path)
    _metric_options(experiment)
    add_audit_arguments(experiment)
    examples(train, "medvision synthesize train chest-xray-pneumonia --data "
                    "../shared/data/chest_xray/train -o runs/chest-gen --max-minutes 50")
    examples(sample, "medvision synthesize sample chest-xray-pneumonia --generator "
                     "runs/chest-gen -o synthetic/ --per-class 500 --classes NORMAL")
    examples(metrics, "medvision synthesize metrics chest-xray-pneumonia --generator "
                      "runs/chest-gen --synthetic synthetic/ --data ../shared/data/chest_xray/"
                      "train --features chest-xray-pneumonia -o runs/chest-gen/quality")
    examples(experiment, "medvision synthesize experiment docs/examples/synthetic-chest.yaml "
                         "--data ../shared/data/chest_xray/train --scarce NORMAL "
                         "--keep-fraction 0.1 --generator-minutes 40 "
                         "--features chest-xray-pneumonia -o runs/synthetic-chest")
    for sub in (train, sample, metrics, experiment):
        sub.set_defaults(run=run)


def _metric_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", metavar="PIPELINE",
                        help="a trained classifier pipeline whose qc.feature_layer features "
                             "are one of the metric spaces (e.g. the shipped pipeline)")
    parser.add_argument("--copy-ratio", type=float, default=0.1,
                        help="flag a synthetic image closer to a training image than this "
                             "share of the typical training-to-training distance (0.1)")
    parser.add_argument("--max-real", type=int, default=2000,
                        help="at most this many real images per side (a seeded sample)")


def _quality(args: argparse.Namespace, pipeline: Any, generator: Path, synthetic: Path,
             out: Path) -> None:
    from medvision.evaluate.synthetic import synthetic_items, synthetic_quality, write_quality
    from medvision.train import pipeline_split
    from medvision.train.synthesize import generator_training_items

    classifier = classifier_pipeline = None
    if args.features:
        from medvision.infer import Predictor

        predictor = Predictor.from_pipeline(args.features, search=args.pipelines_dir)
        classifier, classifier_pipeline = predictor.model, predictor.pipeline
    if getattr(args, "evaluation", "val") == "test":
        from medvision.train import discover_items

        reference = discover_items(pipeline, args.data, split="test")
    else:
        reference = list(pipeline_split(pipeline, args.data).val)
    quality, arrays = synthetic_quality(
        pipeline, synthetic=synthetic_items(pipeline, synthetic),
        training=generator_training_items(pipeline, generator, args.data),
        reference=reference, classifier=classifier,
        classifier_pipeline=classifier_pipeline, copy_ratio=args.copy_ratio,
        max_real=args.max_real)
    _, page = write_quality(quality, arrays, out)
    for name, spaces in quality.distribution.items():
        for space, m in spaces.items():
            print(f"{name} [{space}]: FD {m['fd']:.4g} (real vs real {m['fd_real']:.4g}), "
                  f"precision {m['precision']:.3f}, recall {m['recall']:.3f}")
    for space, m in quality.memorisation.items():
        print(f"memorisation [{space}]: {100 * m['closer_than_typical']:.1f}% closer than "
              f"typical, {int(m['copies'])} likely copies")
    print(f"page: {page}")


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
                                 max_minutes=args.max_minutes, max_steps=args.max_steps,
                                 device=args.device, tracking=args.tracking,
                                 options=options_of(args),
                                 progress=False if args.quiet else None)
        print(f"generator: {result.epochs_run} epoch(s), {result.steps} step(s) in "
              f"{result.seconds:.0f} s; loss {result.loss:.4f}; in {result.run_dir}")
        return 0
    if args.synthesize_action == "metrics":
        _quality(args, pipeline, args.generator, args.synthetic, args.output)
        return 0
    if args.synthesize_action == "experiment":
        from medvision.evaluate.augmentation import comparison_markdown, run_experiment

        comparison = run_experiment(
            pipeline, args.data, args.output, scarce=args.scarce,
            keep_fraction=args.keep_fraction, synthetic_count=args.synthetic_count,
            generator=args.generator, generator_classes=args.generator_classes,
            generator_minutes=args.generator_minutes, evaluation=args.evaluation,
            auditor=auditor_from_args(args))
        if args.features and comparison.n_synthetic:
            _quality(args, pipeline, args.generator or args.output / "generator",
                     args.output / "synthetic", args.output / "quality")
        print(comparison_markdown(comparison), end="")
        return 0
    files = sample(pipeline, args.generator, args.output, per_class=args.per_class,
                   seed=args.seed, classes=args.classes, device=args.device)
    print(f"wrote {len(files)} synthetic image(s) under {args.output}")
    return 0
