"""Does the map point at what the model uses? The deletion curve (Petsiuk et al., 2018).

The most salient voxels are replaced by the baseline (0, the preprocessed mean for z-scored
inputs, black for scaled ones) in growing fractions, and the target score is recorded. A
faithful map makes the score fall fast: a small area under the curve, smaller than for the
same fractions deleted in random order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["deletion_curve"]


def _score(model: Any, images: Any, target: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(images)
    if out.dim() == 2 and out.shape[1] > 1:
        out = torch.softmax(out, dim=1)
    return out[:, target].float().numpy()


def deletion_curve(model: Any, image: Any, saliency: np.ndarray, *, target: int,
                   steps: int = 10, seed: int = 0, batch: int = 4) -> dict[str, Any]:
    """Deletion-curve AUC for ``saliency`` and for a random order, in model space.

    Args:
        model: the network (or a region-score wrapper) returning ``(N, classes)``.
        image: ``(1, C, ...)`` preprocessed input.
        saliency: model-space map with the image's spatial shape.
        target: output index to follow.
        steps: number of deletion fractions after 0.

    Returns:
        ``{"deletion_auc", "random_deletion_auc", "fractions", "scores", "random_scores"}``;
        scores are relative to the undeleted score.
    """
    import torch

    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    flat = np.asarray(saliency).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    random_order = np.random.default_rng(seed).permutation(flat.size)
    fractions = np.linspace(0, 1, steps + 1)

    def curve(ranking: np.ndarray) -> np.ndarray:
        images = []
        for fraction in fractions:
            keep = torch.ones(flat.size)
            keep[torch.as_tensor(ranking[: int(round(fraction * flat.size))])] = 0
            images.append(image * keep.view(1, 1, *image.shape[2:]))
        stacked = torch.cat(images)
        scores = np.concatenate([_score(model, stacked[i:i + batch], target)
                                 for i in range(0, len(stacked), batch)])
        return scores / scores[0] if scores[0] != 0 else scores

    scores, random_scores = curve(order), curve(random_order)
    return {
        "deletion_auc": float(np.trapezoid(scores, fractions)),
        "random_deletion_auc": float(np.trapezoid(random_scores, fractions)),
        "fractions": [round(float(f), 3) for f in fractions],
        "scores": [round(float(s), 5) for s in scores],
        "random_scores": [round(float(s), 5) for s in random_scores],
    }
