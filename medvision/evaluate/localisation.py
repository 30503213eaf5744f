"""How well explanations point at the truth: the share of saliency inside the true region.

For each evaluated item with a ground-truth region (segmentation: the foreground of its label
map; detection: the union of its boxes) the saliency map is computed as ``analyze`` computes
it (the pipeline's method, or ``method``), and scored as the share of its energy (sum of the
non-negative map) inside the region. A map spread evenly would score the region's share of the
image, reported beside it as the chance level. Classification items have no region and are
not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medvision.errors import DataError
from medvision.explain import explain
from medvision.infer import Predictor
from medvision.io import read_volume
from medvision.metrics import bootstrap_interval

__all__ = ["localisation_scores"]


def _region(predictor: Predictor, item: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    task = predictor.pipeline.task
    if task == "segmentation":
        label = np.asarray(read_volume(item["label"]).array[0])
        if label.shape != shape:
            raise DataError(f"{item['label']}: label grid {label.shape} differs from the "
                            f"image's {shape}")
        return label > 0
    region = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in np.asarray(item["boxes"]).reshape(-1, 4):
        region[int(max(x1, 0)):int(np.ceil(x2)), int(max(y1, 0)):int(np.ceil(y2))] = True
    return region


def localisation_scores(predictor: Predictor, items: Sequence[dict[str, Any]], *,
                        method: str | None = None, layer: str | None = None,
                        limit: int | None = None) -> dict[str, Any]:
    """Energy inside the true region per item, with a BCa interval over items."""
    if predictor.pipeline.task == "classification":
        return {"scored": 0, "note": "classification items have no true region to score"}
    inside, chance = [], []
    used_method = method or str(predictor.pipeline.explanation.method)
    for item in list(items)[: limit or None]:
        volume = read_volume(item["image"])
        prepared = predictor.prepare(volume)
        prediction = predictor.predict(prepared)
        saliency = explain(predictor, prepared, prediction, method=method, layer=layer)
        energy = np.clip(np.asarray(saliency.volume.array[0], dtype=np.float64), 0, None)
        region = _region(predictor, item, energy.shape)
        total = float(energy.sum())
        if total <= 0 or not region.any():
            continue
        inside.append(float(energy[region].sum()) / total)
        chance.append(float(region.mean()))
    if not inside:
        return {"scored": 0, "method": used_method, "note": "no item had a region and a map"}
    values, base = np.array(inside), np.array(chance)
    cases = [np.arange(len(values))]
    return {"scored": len(values), "method": used_method,
            "layer": layer or predictor.pipeline.explanation.layer,
            "energy_inside": bootstrap_interval(lambda i: float(values[i].mean()), cases),
            "chance_level": bootstrap_interval(lambda i: float(base[i].mean()), cases)}
