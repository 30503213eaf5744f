"""Shipping a trained run into its pipeline folder, with the OOD guard fitted on its data.

``pipelines/<name>/`` then holds ``model.safetensors``, ``calibration.json`` and
``ood.safetensors`` beside ``pipeline.yaml``; the model card is written by hand from the
evaluation (see docs/training.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline, load_pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.models import build_model, load_weights, weights_sha256
from medvision.models.bundle import MAX_SHIPPED_BYTES, RUN_WEIGHTS_FILE, ModelBundle
from medvision.models.ood import FeatureGuard
from medvision.train.data import DataSplit
from medvision.transforms import build_transforms

__all__ = ["fit_guard", "publish"]

log = logging.getLogger(__name__)


def _loader(pipeline: Pipeline, items: Any) -> Any:
    from monai.data import DataLoader, Dataset

    data = [{k: v for k, v in item.items() if k != "group"} for item in items]
    return DataLoader(Dataset(data, transform=build_transforms(pipeline, train=False)),
                      batch_size=pipeline.training.batch_size, shuffle=False, num_workers=0)


def fit_guard(pipeline: Pipeline, weights: str | os.PathLike[str], split: DataSplit) -> FeatureGuard:
    """Fit the OOD guard: feature statistics on the training items (no augmentation), and
    the threshold at ``qc.quantile`` of the validation items' distances."""
    layer = pipeline.qc.feature_layer
    if not layer:
        raise ConfigError(f"pipeline '{pipeline.name}' names no qc.feature_layer")
    model = build_model(pipeline)
    load_weights(model, weights)
    images = (batch["image"] for batch in _loader(pipeline, split.train))
    train_features = FeatureGuard.features(model, layer, images)
    guard = FeatureGuard.fit(train_features, layer=layer, quantile=pipeline.qc.quantile)
    val_images = (batch["image"] for batch in _loader(pipeline, split.val))
    val_distances = guard.distance(FeatureGuard.features(model, layer, val_images))
    threshold = float(np.quantile(val_distances, pipeline.qc.quantile))
    log.info("OOD guard on %s: %d training features, threshold %.2f", layer,
             len(train_features), threshold)
    return FeatureGuard(layer=layer, mean=guard.mean, precision=guard.precision,
                        threshold=threshold, quantile=guard.quantile)


def publish(run_dir: str | os.PathLike[str], target: str | os.PathLike[str], *,
            split: DataSplit | None) -> dict[str, Any]:
    """Write a run's bundle (best weights, calibration, OOD guard fitted on ``split``) into
    the pipeline folder ``target``.

    Returns a summary (weights SHA-256, temperature, guard threshold).
    """
    run, folder = Path(run_dir), Path(target)
    if not (run / RUN_WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{run}: no {RUN_WEIGHTS_FILE} to publish")
    trained = ModelBundle.load(run, weights=run / RUN_WEIGHTS_FILE)
    pipeline = load_pipeline(folder)
    for part in ("model", "classes", "preprocess", "in_channels", "spatial_dims"):
        if getattr(trained.pipeline, part) != getattr(pipeline, part):
            raise ConfigError(f"{run}: trained with a different '{part}' than {folder}")
    guard = None
    if split is not None and pipeline.qc.feature_layer:
        guard = fit_guard(pipeline, trained.weights, split)
    bundle = replace(trained, pipeline=pipeline, guard=guard, card=None)
    weights = bundle.save(folder)
    stored = "float16" if trained.weights.stat().st_size > MAX_SHIPPED_BYTES else "float32"
    summary: dict[str, Any] = {"weights_sha256": weights_sha256(weights), "stored_as": stored,
                               "bytes": weights.stat().st_size}
    if trained.calibration:
        summary["temperature"] = trained.temperature
    if guard is not None:
        summary["ood"] = guard.describe()
    return summary
