"""Shipping a trained run into its pipeline folder, with the OOD guard fitted on its data.

``pipelines/<name>/`` then holds ``model.safetensors``, ``calibration.json`` and
``ood.safetensors`` beside ``pipeline.yaml``; the model card is written by hand from the
evaluation (see docs/training.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline, load_pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.infer.qc import FeatureGuard
from medvision.models import build_model, load_weights, weights_sha256
from medvision.train.calibration import CALIBRATION_FILE
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


#: Shipped weights stay under 25 MB; larger float32 files are stored as float16.
MAX_SHIPPED_BYTES = 24 * 1024 * 1024


def _save_half(source: Path, target: Path) -> None:
    """Copy safetensors weights with floating-point tensors stored as float16.

    Loading casts them back to the network's float32 parameters; the rounding (relative 5e-4)
    is far below what changes a prediction, and evaluate reports the shipped file's metrics.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(target), metadata={"stored_as": "float16"})


def publish(run_dir: str | os.PathLike[str], target: str | os.PathLike[str], *,
            split: DataSplit | None) -> dict[str, Any]:
    """Copy a run's best weights and calibration into ``target`` and fit the OOD guard there.

    Returns a summary (weights SHA-256, temperature, guard threshold).
    """
    run, folder = Path(run_dir), Path(target)
    weights = run / "best.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{run}: no best.safetensors to publish")
    trained = load_pipeline(run / "pipeline.yaml")
    pipeline = load_pipeline(folder)
    for part in ("model", "classes", "preprocess", "in_channels", "spatial_dims"):
        if getattr(trained, part) != getattr(pipeline, part):
            raise ConfigError(f"{run}: trained with a different '{part}' than {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    target_weights = folder / "model.safetensors"
    stored = "float32"
    if weights.stat().st_size > MAX_SHIPPED_BYTES:
        _save_half(weights, target_weights)
        stored = "float16"
    else:
        shutil.copyfile(weights, target_weights)
    summary: dict[str, Any] = {"weights_sha256": weights_sha256(target_weights),
                               "stored_as": stored,
                               "bytes": target_weights.stat().st_size}
    if (run / CALIBRATION_FILE).is_file():
        shutil.copyfile(run / CALIBRATION_FILE, folder / CALIBRATION_FILE)
        summary["temperature"] = json.loads((run / CALIBRATION_FILE).read_text())["temperature"]
    if split is not None and pipeline.qc.feature_layer:
        guard = fit_guard(pipeline, weights, split)
        guard.save(folder)
        summary["ood"] = guard.describe()
    return summary
