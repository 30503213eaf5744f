"""Model-randomisation sanity check for saliency maps (Adebayo et al., 2018).

A map that explains the model must change when the model's weights are destroyed. For each
input, the configured saliency is computed with the trained weights and with the weights
re-initialised at random; the Spearman rank correlation between the two maps is printed. High
correlation (near 1) would mean the method shows image structure, not the model's reasoning.
Also prints the deletion-curve AUC for trained vs random-order deletion.

    .venv/bin/python bench/sanity_saliency.py [--pipeline chest-xray-pneumonia] [--n 5]
        [--method layercam --layer layer3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from medvision.explain import deletion_curve, explain
from medvision.explain.saliency import explained_model
from medvision.infer import Predictor
from medvision.io import read_volume
from medvision.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_analyze import inputs  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="chest-xray-pneumonia")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--method", default=None)
    parser.add_argument("--layer", default=None, help="GradCAM/LayerCAM layer (default: the "
                        "pipeline's)")
    args = parser.parse_args(argv)
    trained = Predictor.from_pipeline(args.pipeline)
    import torch

    torch.manual_seed(0)
    random_model = build_model(trained.pipeline).eval()
    randomised = Predictor(bundle=replace(trained.bundle, weights_sha256="randomised",
                                          temperature=1.0, guard=None), model=random_model)
    correlations, faithful, random_order = [], [], []
    for path in inputs(args.pipeline, args.n):
        volume = read_volume(path)
        prepared = trained.prepare(volume)
        prediction = trained.predict(prepared)
        saliency = explain(trained, prepared, prediction, method=args.method, layer=args.layer)
        # The randomised network explains the same target as the trained one.
        random_saliency = explain(randomised, randomised.prepare(volume), prediction,
                                  method=args.method, layer=args.layer)
        model, target, _ = explained_model(trained, prediction)
        curve = deletion_curve(model, prepared.image, saliency.model_space, target=target)
        faithful.append(curve["deletion_auc"])
        random_order.append(curve["random_deletion_auc"])
        rho = spearmanr(saliency.model_space.ravel(), random_saliency.model_space.ravel()).statistic
        correlations.append(0.0 if np.isnan(rho) else float(rho))
    method = args.method or trained.pipeline.explanation.method
    layer = args.layer or trained.pipeline.explanation.layer
    print(f"{args.pipeline}, {method} at {layer}, {len(correlations)} inputs: Spearman rho trained vs "
          f"randomised weights median {statistics.median(correlations):.3f} "
          f"(range {min(correlations):.3f}..{max(correlations):.3f}); deletion AUC median "
          f"{statistics.median(faithful):.3f} vs random order {statistics.median(random_order):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
