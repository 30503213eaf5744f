"""Scoring a trained pipeline on labelled data: metrics.json, plots and an HTML summary."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvision.audit.records import Auditor, items_digest, record_run
from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError
from medvision.infer import Predictor
from medvision.io.synthetic import count_synthetic
from medvision.metrics import bootstrap_interval, classification_metrics, segmentation_metrics
from medvision.report.figures import classification_plots, dice_boxplot, volume_agreement
from medvision.report.html import render_evaluation
from medvision.train.data import readable_items

__all__ = ["Part", "evaluate", "evaluate_out_of_fold"]

log = logging.getLogger(__name__)


#: What one scoring pass predicts: a predictor and the items it scores. Several parts are
#: pooled into one set of metrics (out-of-fold: each fold's member on its own fold).
Part = tuple[Predictor, Sequence[dict[str, Any]]]


def evaluate(predictor: Predictor, items: Sequence[dict[str, Any]],
             out_dir: str | os.PathLike[str], *, force: bool = False,
             auditor: Auditor | None = None,
             audit_inputs: dict[str, Any] | None = None,
             explain_items: int | None = None, explain_method: str | None = None,
             explain_layer: str | None = None) -> dict[str, Any]:
    """Score ``predictor`` on ``items`` and write the evaluation folder; returns the metrics.

    Unreadable items are skipped with a warning and listed under ``skipped_items``. With an
    ``auditor`` the run is recorded (``audit_inputs`` describes the data; by default a digest
    of the items). ``explain_items`` (0: all) also scores the explanations' localisation
    (:mod:`medvision.evaluate.localisation`) into ``metrics["explanation"]``.

    Raises:
        ConfigError: ``out_dir`` already holds an evaluation and ``force`` is false.
        DataError: no item is readable.
    """
    return _evaluate([(predictor, items)], out_dir, force=force, auditor=auditor,
                     audit_inputs=audit_inputs, explain_items=explain_items,
                     explain_method=explain_method, explain_layer=explain_layer)


def evaluate_out_of_fold(predictor: Predictor, data: str | os.PathLike[str],
                         out_dir: str | os.PathLike[str], *, force: bool = False,
                         auditor: Auditor | None = None) -> dict[str, Any]:
    """Score a cross-validation ensemble without letting any member see its own training
    data: each member alone (with its own calibration temperature) predicts the validation
    side of the fold it was trained for, and the predictions of all folds are pooled into one
    set of metrics with CIs (every case once). ``metrics["per_fold"]`` has each fold's
    headline metrics and their mean and standard deviation (the fold spread).

    This is the cross-validation estimate of one member; the averaged ensemble has no
    held-out data in ``data`` and is usually at least as good.

    Raises:
        ConfigError: the pipeline is not a cross-validation ensemble.
        DataError: no readable item.
    """
    from dataclasses import replace

    from medvision.train import pipeline_split

    bundle = predictor.bundle
    if not bundle.members or any(m.fold is None for m in bundle.members):
        raise ConfigError(f"{bundle.pipeline.name}: not a cross-validation ensemble (publish "
                          "the 'train --fold I' runs together); out-of-fold needs one")
    parts: list[Part] = []
    for member in bundle.members:
        single = replace(bundle, weights=member.weights, weights_sha256=member.weights_sha256,
                         temperature=member.temperature, members=())
        split = pipeline_split(bundle.pipeline, data, fold=member.fold)
        parts.append((Predictor.from_bundle(single, backend=predictor.kind), split.val))
    return _evaluate(parts, out_dir, force=force, auditor=auditor,
                     audit_inputs={"data": items_digest([i for _, p in parts for i in p]),
                                   "split": "out-of-fold",
                                   "weights_sha256": predictor.weights_sha256},
                     folds=[m.fold for m in bundle.members], reported=predictor)


def _evaluate(parts: Sequence[Part], out_dir: str | os.PathLike[str], *, force: bool,
              auditor: Auditor | None, audit_inputs: dict[str, Any] | None,
              explain_items: int | None = None, explain_method: str | None = None,
              explain_layer: str | None = None, folds: Sequence[int | None] | None = None,
              reported: Predictor | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(out_dir)
    if (out / "metrics.json").exists() and not force:
        raise ConfigError(f"{out}: holds an evaluation already; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    predictor = reported or parts[0][0]
    pipeline = predictor.pipeline
    readable: list[Part] = []  # parts with a readable item, with their folds
    kept_folds: list[int | None] = []
    skipped: list[tuple[str, str]] = []
    for (part_predictor, part_items), fold in zip(parts, folds or [None] * len(parts),
                                                  strict=True):
        good, bad = readable_items(part_items)
        skipped += bad
        if good:
            readable.append((part_predictor, good))
            kept_folds.append(fold)
    items = [item for _, part_items in readable for item in part_items]
    if not items:
        raise DataError(f"no readable item to evaluate ({len(skipped)} unreadable)")
    per_case = None
    if pipeline.task == "classification":
        metrics, images, per_case = _classification(readable, out)
    elif pipeline.task == "detection":
        if len(readable) > 1:
            raise ConfigError("detection ensembles are not supported")
        metrics, images = _detection(*readable[0], out)
    else:
        metrics, images, per_case = _segmentation(readable, out)
    if folds is not None and per_case is not None:
        metrics["per_fold"] = _per_fold(per_case, readable, kept_folds, pipeline)
    metrics["pipeline"] = {"name": pipeline.name, "version": pipeline.version,
                           "weights": str(predictor.weights),
                           "weights_sha256": predictor.weights_sha256,
                           "temperature": predictor.temperature,
                           "calibration": predictor.bundle.calibration_note}
    metrics["skipped_items"] = [{"path": p, "reason": r} for p, r in skipped]
    synthetic = count_synthetic(items)
    if synthetic:  # scores on images that are not patients say so
        metrics["synthetic_items"] = synthetic
        log.warning("%d of the %d evaluated items are synthetic images", synthetic, len(items))
    if explain_items is not None:
        from medvision.evaluate.localisation import localisation_scores

        metrics["explanation"] = localisation_scores(predictor, items, method=explain_method,
                                                     layer=explain_layer,
                                                     limit=explain_items or None)
    if folds is not None:
        metrics["split"] = "out-of-fold: each fold's member on its own validation side"
    metrics["interval_note"] = (
        "Detection metrics have percentile bootstrap intervals over images."
        if pipeline.task == "detection" else
        "Proportions have Wilson score intervals; AUC, F1, ECE, Dice and distances have BCa "
        "bootstrap intervals over cases (resampled within each class for classification).")
    metrics["device"] = {**predictor.device_info.as_dict(), "precision": predictor.precision}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "summary.html").write_text(render_evaluation(metrics, [p.name for p in images]))
    if auditor is not None:
        headline: dict[str, Any] = {k: metrics[k]["value"] for k in ("accuracy", "auc", "dice",
                                                                      "map_50") if k in metrics}
        headline["device"] = metrics["device"]
        inputs = audit_inputs or {"data": items_digest(items)}
        if synthetic:
            inputs = {**inputs, "synthetic_items": synthetic}
        record_run(auditor, action="evaluate", status="ok", pipeline=pipeline, inputs=inputs,
                   outputs=[out / "metrics.json", out / "summary.html"], result=headline,
                   seconds=time.perf_counter() - started,
                   weights_sha256=predictor.weights_sha256)
    return metrics


#: Per-case scores that per-fold metrics are computed from: (probabilities, labels) for
#: classification, (Dice, HD95) for segmentation.
PerCase = tuple[np.ndarray, np.ndarray]


def _classification(parts: Sequence[Part],
                    out: Path) -> tuple[dict[str, Any], list[Path], PerCase]:
    import torch

    pipeline = parts[0][0].pipeline
    probs_parts, labels = [], []
    for predictor, part_items in parts:
        logits = []
        for _, batch_logits, batch_labels in predictor.run_items(part_items):
            logits.append(batch_logits.as_tensor() if hasattr(batch_logits, "as_tensor")
                          else batch_logits)
            labels.append(torch.as_tensor(batch_labels).view(-1))
        probs_parts.append(torch.softmax(torch.cat(logits) / predictor.temperature, dim=1))
    probs = torch.cat(probs_parts).numpy()
    truth = torch.cat(labels).numpy().astype(int)
    items = [item for _, part_items in parts for item in part_items]
    metrics = classification_metrics(probs, truth, pipeline.classes,
                                     threshold=pipeline.inference.threshold)
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "label", *[f"p_{c}" for c in pipeline.classes]])
        for item, label, row in zip(items, truth, probs, strict=True):
            name = item["image"] if isinstance(item["image"], str) else item.get("group", "")
            writer.writerow([name, pipeline.classes[label], *[f"{p:.6f}" for p in row]])
    auc = {name: item["auc"]["value"] for name, item in metrics["per_class"].items()}
    images = classification_plots(probs, truth, pipeline.classes,
                                  metrics["confusion_matrix"]["rows_true_columns_predicted"], out,
                                  auc=auc)
    return metrics, images, (probs, truth)


def _segmentation(parts: Sequence[Part],
                  out: Path) -> tuple[dict[str, Any], list[Path], PerCase]:
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    classes = parts[0][0].pipeline.classes
    items = [item for _, part_items in parts for item in part_items]
    dice_rows, hd_rows, volume_rows, reference_rows = [], [], [], []
    for predictor, part_items in parts:
        for batch, logits, label in predictor.run_items(part_items, batch_size=1):
            spacing = np.linalg.norm(np.asarray(batch["image"].affine[0])[:3, :3], axis=0)
            pred = one_hot(logits.argmax(dim=1, keepdim=True), len(classes))
            truth = one_hot(label.long(), len(classes))
            voxel_ml = float(np.prod(spacing)) / 1000.0
            volume_rows.append(pred[0, 1:].flatten(1).sum(dim=1).numpy() * voxel_ml)
            reference_rows.append(truth[0, 1:].flatten(1).sum(dim=1).numpy() * voxel_ml)
            dice_rows.append(compute_dice(pred, truth, include_background=False).numpy()[0])
            # one spacing per spatial axis of the image (a 2D image's affine is still 4x4)
            hd_rows.append(compute_hausdorff_distance(
                pred, truth, include_background=False, percentile=95,
                spacing=spacing[: pred.dim() - 2].tolist()).numpy()[0])
    dice, hd95 = np.array(dice_rows, dtype=float), np.array(hd_rows, dtype=float)
    volumes, references = np.array(volume_rows), np.array(reference_rows)
    metrics = segmentation_metrics(dice, hd95, classes[1:])
    metrics["volume_error_ml_per_class"] = {
        name: {**bootstrap_interval(_volume_error(volumes, references, c),
                                    [np.arange(len(volumes))]), "unit": "mL"}
        for c, name in enumerate(classes[1:])}
    with (out / "cases.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", *[f"dice_{c}" for c in classes[1:]],
                         *[f"hd95_mm_{c}" for c in classes[1:]],
                         *[f"volume_ml_{c}" for c in classes[1:]],
                         *[f"reference_volume_ml_{c}" for c in classes[1:]]])
        for item, d, h, v, r in zip(items, dice, hd95, volumes, references, strict=True):
            writer.writerow([item["image"], *[f"{x:.4f}" for x in d], *[f"{x:.2f}" for x in h],
                             *[f"{x:.4f}" for x in v], *[f"{x:.4f}" for x in r]])
    return metrics, [dice_boxplot(dice, classes[1:], out),
                     volume_agreement(volumes, references, classes[1:], out)], (dice, hd95)


def _per_fold(per_case: PerCase, parts: Sequence[Part], folds: Sequence[int | None],
              pipeline: Pipeline) -> dict[str, Any]:
    """Each part's headline metrics (value and CI) and their mean and standard deviation."""
    first, second = per_case
    keys = ("accuracy", "auc") if pipeline.task == "classification" else ("dice",)
    result: dict[str, Any] = {}
    start = 0
    for (_, part_items), fold in zip(parts, folds, strict=True):
        rows = slice(start, start + len(part_items))
        start += len(part_items)
        scored = (classification_metrics(first[rows], second[rows], pipeline.classes,
                                          threshold=pipeline.inference.threshold)
                  if pipeline.task == "classification" else
                  segmentation_metrics(first[rows], second[rows], pipeline.classes[1:]))
        result[f"fold {fold}"] = {"n": len(part_items),
                                  **{k: {"value": scored[k]["value"], "ci95": scored[k]["ci95"]}
                                     for k in keys}}
    folds_only = list(result.values())
    for k in keys:
        values = [entry[k]["value"] for entry in folds_only]
        result[f"{k}_mean"] = float(np.mean(values))
        result[f"{k}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return result


def _volume_error(volumes: np.ndarray, references: np.ndarray,
                  column: int) -> Callable[[np.ndarray], float]:
    """Mean predicted minus reference volume of one class over the chosen cases."""
    def error(index: np.ndarray) -> float:
        return float(np.mean(volumes[index, column] - references[index, column]))

    return error


def _detection(predictor: Predictor, items: Sequence[dict[str, Any]],
               out: Path) -> tuple[dict[str, Any], list[Path]]:
    from medvision.io import read_volume
    from medvision.metrics import detection_metrics
    from medvision.models.detection import detect
    from medvision.report.figures import box_examples, detection_pr_curves

    pipeline = predictor.pipeline
    predictions = []
    for item in items:  # the analysis's own reading, preprocessing and mapping back
        prepared = predictor.prepare(read_volume(item["image"]))
        predictions.append(detect(predictor.model, prepared.image[0], prepared.data["zoom"]))
    metrics = detection_metrics(predictions, items, pipeline.classes)
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "class", "score", "x1", "y1", "x2", "y2"])
        for item, found in zip(items, predictions, strict=True):
            for box, label, score in zip(found["boxes"], found["labels"], found["scores"],
                                         strict=True):
                writer.writerow([item["image"], pipeline.classes[int(label)], f"{score:.4f}",
                                 *[f"{v:.1f}" for v in box]])
    colours = {name: pipeline.report.colour(name, k + 1)
               for k, name in enumerate(pipeline.classes)}
    images = [detection_pr_curves(predictions, items, pipeline.classes, out,
                                  ap={n: v["ap_50"]["value"]
                                      for n, v in metrics["per_class"].items()})]
    from medvision.io import read_volume

    shown = [np.asarray(read_volume(item["image"]).array) for item in items[:4]]
    images += box_examples(shown, items[:4], predictions[:4], pipeline.classes, colours, out)
    return metrics, images
