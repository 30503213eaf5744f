"""Training a detection pipeline (MONAI RetinaNet): transforms that keep boxes with the image,
a resumable loop, and prediction in the original image's pixels.

The run folder is laid out like a classification run: ``best.safetensors`` (best validation
mAP@0.5), ``last.safetensors`` with ``optimizer.safetensors`` and ``state.json`` to resume,
``metrics.csv`` (one row per epoch), ``pipeline.yaml`` and ``split.json``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import CheckpointError
from medvision.models import load_weights, weights_sha256
from medvision.models.detection import build_detector
from medvision.tracking import Tracker
from medvision.train.engine import (
    BEST_FILE,
    LAST_FILE,
    METRICS_FILE,
    PIPELINE_FILE,
    SPLIT_FILE,
    Engine,
    RunFolder,
    StepOutput,
    TrainingState,
    engine_for,
)
from medvision.train.progress import EpochReport, tracked, tracking_targets
from medvision.transforms.chain import detection_transforms

__all__ = ["DetectionResult", "detection_transforms", "predict_boxes", "train_detection"]

log = logging.getLogger(__name__)

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


def _device_inputs(batch: list[dict[str, Any]], device: Any = None
                   ) -> tuple[list[Any], list[dict[str, Any]]]:
    import torch

    images = [torch.as_tensor(item["image"], device=device).float() for item in batch]
    targets = [{"boxes": torch.as_tensor(item["boxes"], dtype=torch.float32, device=device)
                .reshape(-1, 4),
                "labels": torch.as_tensor(item["labels"], dtype=torch.int64, device=device)
                .reshape(-1)}
               for item in batch]
    return images, targets


def predict_boxes(detector: Any, pipeline: Pipeline, items: Sequence[Mapping[str, Any]], *,
                  device: Any = None) -> list[dict[str, np.ndarray]]:
    """Every box kept for each item (no score threshold: what mAP needs), in the original
    image's pixels; the transforms and the mapping back are the analysis's own."""
    from monai.data import DataLoader, Dataset

    from medvision.models.detection import detect

    transform = detection_transforms(pipeline, train=False, with_boxes=False)
    data = [{"image": item["image"]} for item in items]
    loader = DataLoader(Dataset(data, transform=transform), batch_size=1, shuffle=False,
                        num_workers=0, collate_fn=_collate)
    detector.eval()
    out = []
    for batch in loader:
        item = batch[0]
        image = item["image"].to(device) if device is not None else item["image"]
        out.append(detect(detector, image, item["zoom"]))
    return out


def train_detection(pipeline: Pipeline, train_items: Sequence[dict[str, Any]],
                    val_items: Sequence[dict[str, Any]], run_dir: str | os.PathLike[str], *,
                    resume: bool = False, eval_every: int = 2, device: str | None = "auto",
                    max_minutes: float | None = None, progress: bool | None = None,
                    tracking: Sequence[str] | str | None = None,
                    options: Mapping[str, Any] | None = None) -> DetectionResult:
    """Train ``pipeline``'s detector; the best epoch by validation mAP@0.5 is kept.

    Raises:
        ConfigError: a non-empty run folder without ``resume``.
        DeviceError: the device is not there.
        CheckpointError: nothing to resume from.
    """
    from medvision.audit.records import items_digest

    targets = tracking_targets(pipeline, tracking)
    engine = engine_for(pipeline, device)
    try:
        run = RunFolder(run_dir, resume=resume, writer=engine.is_main)
        with tracked(targets, run, pipeline=pipeline, kind="train", engine=engine,
                     options=options, data={"train": items_digest(train_items),
                                            "val": items_digest(val_items)}) as tracker:
            return _train_detection(pipeline, train_items, val_items, run, engine=engine,
                                    resume=resume, eval_every=eval_every,
                                    max_minutes=max_minutes, progress=progress,
                                    tracker=tracker)
    finally:
        engine.close()


def _train_detection(pipeline: Pipeline, train_items: Sequence[dict[str, Any]],
                     val_items: Sequence[dict[str, Any]], run: RunFolder, *,
                     engine: Engine, resume: bool, eval_every: int, max_minutes: float | None,
                     progress: bool | None, tracker: Tracker) -> DetectionResult:
    import torch
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    from medvision.metrics import detection_metrics

    cfg = pipeline.training
    set_determinism(seed=cfg.seed)
    detector = build_detector(pipeline).to(engine.device)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=pipeline.optimizer.lr,
                                  weight_decay=pipeline.optimizer.weight_decay)
    warmup = pipeline.schedule.warmup_epochs or 0

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(1, cfg.epochs - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    state = TrainingState(best_metric=-1.0)
    if resume:
        state = run.restore(model=detector, optimizer=optimizer, scheduler=scheduler,
                            device=engine.device)
        log.info("resuming at epoch %d (best mAP@0.5 %.4f at %d)", state.epoch + 1,
                 state.best_metric if state.best_metric is not None else -1.0,
                 state.best_epoch)
    else:
        run.write_pipeline(pipeline)
        run.write_json(SPLIT_FILE, {"train": [i["image"] for i in train_items],
                                    "val": [i["image"] for i in val_items]})
    network = engine.prepare_model(detector)
    transform = detection_transforms(pipeline, train=True)
    dataset = CacheDataset([dict(i) for i in train_items], transform=transform, progress=False,
                    num_workers=0)
    loader = engine.loader(dataset, batch_size=cfg.batch_size, train=True,
                           num_workers=cfg.num_workers, collate_fn=_collate)

    def step(batch: list[dict[str, Any]]) -> StepOutput:
        images, targets = _device_inputs(batch, engine.device)
        losses = network(images, targets)
        return StepOutput(loss=losses["classification"] + losses["box_regression"],
                          samples=len(images),
                          parts={k: losses[k].detach() for k in ("classification",
                                                                  "box_regression")})

    def epoch(number: int, state: TrainingState) -> TrainingState:
        network.train()
        stats = engine.run_epoch(loader, step, optimizer=optimizer, epoch=number,
                                 description=f"epoch {number}/{cfg.epochs}",
                                 progress=progress, clip=10.0,
                                 parameters=detector.parameters())
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row: dict[str, Any] = {"epoch": number, "lr": lr, "train_loss": stats.loss,
                               "train_cls_loss": stats.parts.get("classification", 0.0),
                               "train_box_loss": stats.parts.get("box_regression", 0.0),
                               "train_seconds": round(stats.seconds, 2),
                               "data_wait_share": round(stats.data_wait_share, 4),
                               "val_map_50": ""}
        best = state.best_metric if state.best_metric is not None else -1.0
        state = state.replace(epoch=number, step=state.step + stats.steps, loss=stats.loss,
                              seconds=state.seconds + stats.seconds)
        if number % eval_every == 0 or number == cfg.epochs:
            predictions = predict_boxes(detector, pipeline, val_items, device=engine.device)
            value = float(detection_metrics(predictions, val_items, pipeline.classes,
                                  intervals=False)["map_50"]["value"])
            row["val_map_50"] = round(value, 4)
            if value > best:
                state = state.replace(best_metric=value, best_epoch=number)
                run.save_weights(detector, BEST_FILE)
        patience = cfg.early_stopping_patience
        if patience and state.best_epoch and number - state.best_epoch >= patience * eval_every:
            log.info("no improvement for %d epochs: stopping", number - state.best_epoch)
            state = state.replace(early_stopped=True)
        state = state.replace(history=(*state.history, row))
        run.checkpoint(state, model=detector, optimizer=optimizer, scheduler=scheduler)
        log.info("epoch %d: %s", number, row)
        return state

    before = state.epoch
    report = EpochReport(run, epochs=cfg.epochs, monitor="val_map_50", tracker=tracker)
    state = engine.fit(state, epochs=cfg.epochs, epoch=epoch, max_minutes=max_minutes,
                       report=report)
    engine.barrier()
    if run.writer and not (run / BEST_FILE).is_file():
        if not (run / LAST_FILE).is_file():
            raise CheckpointError(f"{run.path}: training produced no weights")
        shutil.copyfile(run / LAST_FILE, run / BEST_FILE)
    if tracker:
        tracker.log_metrics({"best_val_map_50": state.best_metric,
                             "best_epoch": state.best_epoch}, step=state.epoch)
        tracker.set_tags({"medvision.weights_sha256": weights_sha256(run / BEST_FILE)})
        report.finish()
        tracker.log_artifacts([run / n for n in (PIPELINE_FILE, SPLIT_FILE, METRICS_FILE)])
    return DetectionResult(run_dir=run.path, epochs_run=state.epoch - before,
                           best_epoch=state.best_epoch,
                           best_metric=float(state.best_metric if state.best_metric is not None
                                             else -1.0),
                           seconds=state.seconds)


def load_detector(pipeline: Pipeline, weights: str | os.PathLike[str]) -> Any:
    """The pipeline's detector with ``weights`` loaded, in eval mode."""
    detector = build_detector(pipeline)
    load_weights(detector, weights)
    detector.eval()
    return detector
