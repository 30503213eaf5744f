"""``medvision export PIPELINE --format onnx``: the network for onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medvision.cli.conventions import add_pipeline_argument, examples, pipeline_of

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``export``."""
    parser = subparsers.add_parser(
        "export", help="export a pipeline's network (ONNX)",
        description="Writes the network as ONNX beside its weights (model.onnx), where "
                    "'analyze --backend onnx' looks for it, and checks it against PyTorch.")
    add_pipeline_argument(parser, what="the pipeline to export")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--weights", help="weights to export instead of the pipeline's")
    parser.add_argument("-o", "--output", type=Path,
                        help="output file (default: beside the weights, .onnx)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    examples(parser, 'medvision export --pipeline chest-xray-pneumonia --format onnx')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then compare ONNX and PyTorch logits on a random input."""
    import numpy as np
    import torch

    from medvision.errors import ModelError
    from medvision.infer import Predictor
    from medvision.infer.onnx_backend import OnnxModel, export_onnx

    predictor = Predictor.from_pipeline(pipeline_of(args), weights=args.weights,
                                        search=args.pipelines_dir)
    pipeline = predictor.pipeline
    target = args.output or predictor.weights.with_suffix(".onnx")
    if target.exists() and not args.force:
        raise ModelError(f"{target} exists; pass --force to overwrite")
    size = pipeline.preprocess.size or (64,) * pipeline.spatial_dims
    if pipeline.task == "detection":
        from medvision.infer.onnx_backend import OnnxDetectionHead, export_detection_onnx

        export_detection_onnx(predictor.model, tuple(size), pipeline.in_channels, target)
        example = torch.rand((1, pipeline.in_channels, *size))
        with torch.no_grad():
            reference = predictor.model.network(example)
            mirrored = OnnxDetectionHead(target)(example)
        difference = max(float((a - b).abs().max()) for key in reference
                         for a, b in zip(reference[key], mirrored[key], strict=True))
        print(f"wrote {target}; max |onnx - torch| head output difference {difference:.2e}")
        return 0
    members = predictor.bundle.members
    if members and args.output is None:  # an ensemble: every member beside its weights
        jobs = [(predictor.bundle.member_network(m), m.weights.with_suffix(".onnx"))
                for m in members]
        for _, path in jobs[1:]:
            if path.exists() and not args.force:
                raise ModelError(f"{path} exists; pass --force to overwrite")
    else:
        jobs = [(predictor.model, target)]
    example = torch.randn((2, pipeline.in_channels, *size))
    for network, path in jobs:
        export_onnx(network, tuple(size), pipeline.in_channels, path,
                    dynamic_spatial=pipeline.task == "segmentation")
        with torch.no_grad():
            reference = network(example).numpy()
        difference = float(np.abs(OnnxModel(path)(example).numpy() - reference).max())
        print(f"wrote {path}; max |onnx - torch| logit difference {difference:.2e}")
    return 0
