"""Training a detection pipeline (MONAI RetinaNet): transforms that keep boxes with the image,
a resumable loop, and prediction in the original image's pixels.

The run folder is laid out like a classification run: ``best.safetensors`` (best validation
mAP@0.5), ``last.safetensors`` with ``optimizer.safetensors`` and ``state.json`` to resume,
``metrics.csv`` (one row per epoch), ``pipeline.yaml`` and ``split.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.atomic import append_csv
from medvision.config import Pipeline
from medvision.errors import CheckpointError
from medvision.models import load_weights, save_weights
from medvision.models.detection import build_detector
from medvision.train.checkpoint_state import (
    load_training_state,
    open_run_dir,
    save_training_state,
)
from medvision.transforms.chain import LoadVolumed

__all__ = ["DetectionResult", "detection_transforms", "predict_boxes", "train_detection"]

log = logging.getLogger(__name__)

BOX_KEYS: dict[str, Any] = {"image_keys": "image", "box_keys": "boxes", "box_ref_image_keys": "image"}


class ResizeWithBoxesd:
    """Resize the image to ``preprocess.size`` and its boxes with it (MONAI's ``ZoomBoxd``
    with this image's zoom factors); the factors are kept under ``zoom`` to map predictions
    back to the original pixels."""

    def __init__(self, size: Sequence[int] | None) -> None:
        self.size = tuple(size) if size else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.apps.detection.transforms.dictionary import ZoomBoxd

        out = dict(data)
        shape = tuple(out["image"].shape[1:])
        if self.size is None or shape == self.size:
            out["zoom"] = np.ones(len(shape), dtype=np.float32)
            return out
        zoom = [t / s for t, s in zip(self.size, shape, strict=True)]
        if "boxes" in out:
            out = dict(ZoomBoxd(zoom=zoom, keep_size=False, **BOX_KEYS)(out))
        else:
            from monai.transforms import Zoomd

            out = dict(Zoomd("image", zoom=zoom, keep_size=False, mode="area")(out))
        out["zoom"] = np.asarray(zoom, dtype=np.float32)
        return out


def detection_transforms(pipeline: Pipeline, *, train: bool, with_boxes: bool = True) -> Any:
    """Load, scale to [0, 1], resize with the boxes; in training also random flips, 90-degree
    rotations, zoom and intensity changes, each moving the boxes with the image."""
    from monai import transforms as mt
    from monai.apps.detection.transforms import dictionary as bt

    steps: list[Any] = [LoadVolumed(["image"], channels=[pipeline.in_channels]),
                        mt.ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0,
                                                b_max=1.0, clip=True)]
    if with_boxes:
        steps.append(mt.EnsureTyped(["boxes"], dtype=np.float32, track_meta=False))
        steps.append(mt.EnsureTyped(["labels"], dtype=np.int64, track_meta=False))
    steps.append(ResizeWithBoxesd(pipeline.preprocess.size))
    if with_boxes:
        steps.append(bt.ClipBoxToImaged(box_keys="boxes", label_keys="labels",
                                        box_ref_image_keys="image", remove_empty=True))
    if train and with_boxes:
        aug = pipeline.augment
        for axis in aug.flip_axes:
            steps.append(bt.RandFlipBoxd(prob=0.5, spatial_axis=axis, **BOX_KEYS))
        if aug.rotate_degrees >= 90 and pipeline.spatial_dims == 2:
            steps.append(bt.RandRotateBox90d(prob=0.5, max_k=3, spatial_axes=(0, 1), **BOX_KEYS))
        if aug.scale > 0:
            steps.append(bt.RandZoomBoxd(prob=aug.prob, min_zoom=1 - aug.scale,
                                         max_zoom=1 + aug.scale, keep_size=True, **BOX_KEYS))
            steps.append(bt.ClipBoxToImaged(box_keys="boxes", label_keys="labels",
                                            box_ref_image_keys="image", remove_empty=True))
        if aug.gamma is not None:
            steps.append(mt.RandAdjustContrastd("image", prob=aug.prob, gamma=aug.gamma))
        if aug.noise_std > 0:
            steps.append(mt.RandGaussianNoised("image", prob=aug.prob, std=aug.noise_std))
        if aug.intensity_shift > 0:
            steps.append(mt.RandShiftIntensityd("image", offsets=aug.intensity_shift,
                                                prob=aug.prob))
    return mt.Compose(steps)


@dataclass(frozen=True)
class DetectionResult:
    """What a detection training run produced."""

    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_metric: float
    seconds: float


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _device_inputs(batch: list[dict[str, Any]]) -> tuple[list[Any], list[dict[str, Any]]]:
    import torch

    images = [torch.as_tensor(item["image"]).float() for item in batch]
    targets = [{"boxes": torch.as_tensor(np.asarray(item["boxes"]), dtype=torch.float32)
                .reshape(-1, 4),
                "labels": torch.as_tensor(np.asarray(item["labels"]), dtype=torch.int64)}
               for item in batch]
    return images, targets


def predict_boxes(detector: Any, pipeline: Pipeline, items: Sequence[Mapping[str, Any]],
                  ) -> list[dict[str, np.ndarray]]:
    """Boxes, labels and scores for each item, in the original image's pixels."""
    import torch
    from monai.data import DataLoader, Dataset

    transform = detection_transforms(pipeline, train=False, with_boxes=False)
    data = [{"image": item["image"]} for item in items]
    loader = DataLoader(Dataset(data, transform=transform), batch_size=1, shuffle=False,
                        num_workers=0, collate_fn=_collate)
    out = []
    detector.eval()
    with torch.no_grad():
        for batch in loader:
            item = batch[0]
            found = detector([torch.as_tensor(item["image"]).float()])[0]
            scale = np.concatenate([item["zoom"], item["zoom"]]).astype(np.float32)
            boxes = found["boxes"].numpy().astype(np.float32) / scale
            out.append({"boxes": boxes, "labels": found["labels"].numpy().astype(np.int64),
                        "scores": found["labels_scores"].numpy().astype(np.float32)})
    return out



def train_detection(pipeline: Pipeline, train_items: Sequence[dict[str, Any]],
                    val_items: Sequence[dict[str, Any]], run_dir: str | os.PathLike[str], *,
                    resume: bool = False, eval_every: int = 2) -> DetectionResult:
    """Train ``pipeline``'s detector; the best epoch by validation mAP@0.5 is kept.

    Raises:
        ConfigError: a non-empty run folder without ``resume``.
        CheckpointError: nothing to resume from.
    """
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.utils import set_determinism

    from medvision.metrics import detection_metrics

    run = open_run_dir(run_dir, resume=resume)
    cfg = pipeline.training
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(seed=cfg.seed)
    detector = build_detector(pipeline)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=pipeline.optimizer.lr,
                                  weight_decay=pipeline.optimizer.weight_decay)
    warmup = pipeline.schedule.warmup_epochs or 0

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(1, cfg.epochs - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start, best, best_epoch = 0, -1.0, 0
    if resume:
        state = load_training_state(run, model=detector, optimizer=optimizer,
                                    scheduler=scheduler)
        start, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        log.info("resuming at epoch %d (best mAP@0.5 %.4f at %d)", start + 1, best, best_epoch)
    else:
        (run / "pipeline.yaml").write_text(_yaml(pipeline))
        (run / "split.json").write_text(json.dumps(
            {"train": [i["image"] for i in train_items], "val": [i["image"] for i in val_items]},
            indent=1))
    transform = detection_transforms(pipeline, train=True)
    dataset = CacheDataset([dict(i) for i in train_items], transform=transform, progress=False,
                           num_workers=0)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        num_workers=cfg.num_workers, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(cfg.seed))
    started = time.perf_counter()
    epoch = start
    for epoch in range(start, cfg.epochs):
        detector.train()
        t0 = time.perf_counter()
        totals = {"classification": 0.0, "box_regression": 0.0}
        batches = 0
        for batch in loader:
            images, targets = _device_inputs(batch)
            losses = detector(images, targets)
            loss = losses["classification"] + losses["box_regression"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(detector.parameters(), 10.0)
            optimizer.step()
            for key in totals:
                totals[key] += float(losses[key].detach())
            batches += 1
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr,
                               "train_cls_loss": totals["classification"] / max(batches, 1),
                               "train_box_loss": totals["box_regression"] / max(batches, 1),
                               "train_seconds": round(time.perf_counter() - t0, 2),
                               "val_map_50": ""}
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % eval_every == 0 or last:
            predictions = predict_boxes(detector, pipeline, val_items)
            metrics = detection_metrics(predictions, val_items, pipeline.classes,
                                        intervals=False)
            value = float(metrics["map_50"]["value"])
            row["val_map_50"] = round(value, 4)
            if value > best:
                best, best_epoch = value, epoch + 1
                save_weights(detector, run / "best.safetensors")
        append_csv(run / "metrics.csv", row)
        log.info("epoch %d: %s", epoch + 1, row)
        save_training_state(run, model=detector, optimizer=optimizer, scheduler=scheduler,
                            state={"epoch": epoch + 1, "best": best, "best_epoch": best_epoch})
        patience = cfg.early_stopping_patience
        if patience and best_epoch and epoch + 1 - best_epoch >= patience * eval_every:
            log.info("no improvement for %d epochs: stopping", epoch + 1 - best_epoch)
            break
    if not (run / "best.safetensors").is_file():
        if not (run / "last.safetensors").is_file():
            raise CheckpointError(f"{run}: training produced no weights")
        shutil.copyfile(run / "last.safetensors", run / "best.safetensors")
    return DetectionResult(run_dir=run, epochs_run=epoch + 1 - start, best_epoch=best_epoch,
                           best_metric=best, seconds=time.perf_counter() - started)


def load_detector(pipeline: Pipeline, weights: str | os.PathLike[str]) -> Any:
    """The pipeline's detector with ``weights`` loaded, in eval mode."""
    detector = build_detector(pipeline)
    load_weights(detector, weights)
    detector.eval()
    return detector


def _yaml(pipeline: Pipeline) -> str:
    import yaml

    return str(yaml.safe_dump(pipeline.model_dump(mode="json"), sort_keys=False))
