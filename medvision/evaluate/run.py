"""Scoring a trained pipeline on labelled data: metrics.json, plots and an HTML summary."""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import ConfigError, DataError
from medvision.infer import Predictor
from medvision.metrics import classification_metrics, segmentation_metrics
from medvision.report.evaluation_figures import classification_plots, dice_boxplot
from medvision.train.data import readable_items

__all__ = ["evaluate"]


def evaluate(predictor: Predictor, items: Sequence[dict[str, Any]],
             out_dir: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any]:
    """Score ``predictor`` on ``items`` and write the evaluation folder; returns the metrics.

    Unreadable items are skipped with a warning and listed under ``skipped_items``.

    Raises:
        ConfigError: ``out_dir`` already holds an evaluation and ``force`` is false.
        DataError: no item is readable.
    """
    out = Path(out_dir)
    if (out / "metrics.json").exists() and not force:
        raise ConfigError(f"{out}: holds an evaluation already; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    pipeline = predictor.pipeline
    items, skipped = readable_items(items)
    if not items:
        raise DataError(f"no readable item to evaluate ({len(skipped)} unreadable)")
    if pipeline.task == "classification":
        metrics, images = _classification(predictor, items, out)
    else:
        metrics, images = _segmentation(predictor, items, out)
    metrics["pipeline"] = {"name": pipeline.name, "version": pipeline.version,
                           "weights": str(predictor.weights),
                           "weights_sha256": predictor.weights_sha256,
                           "temperature": predictor.temperature}
    metrics["skipped_items"] = [{"path": p, "reason": r} for p, r in skipped]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "summary.html").write_text(_html(metrics, images))
    return metrics


def _classification(predictor: Predictor, items: Sequence[dict[str, Any]],
                    out: Path) -> tuple[dict[str, Any], list[Path]]:
    import torch

    pipeline = predictor.pipeline
    logits, labels = [], []
    for _, batch_logits, batch_labels in predictor.run_items(items):
        logits.append(batch_logits.as_tensor() if hasattr(batch_logits, "as_tensor")
                      else batch_logits)
        labels.append(torch.as_tensor(batch_labels).view(-1))
    probs = torch.softmax(torch.cat(logits) / predictor.temperature, dim=1).numpy()
    truth = torch.cat(labels).numpy().astype(int)
    metrics = classification_metrics(probs, truth, pipeline.classes,
                                     threshold=pipeline.inference.threshold)
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "label", *[f"p_{c}" for c in pipeline.classes]])
        for item, label, row in zip(items, truth, probs, strict=True):
            name = item["image"] if isinstance(item["image"], str) else item.get("group", "")
            writer.writerow([name, pipeline.classes[label], *[f"{p:.6f}" for p in row]])
    images = classification_plots(probs, truth, pipeline.classes,
                                  metrics["confusion_matrix"]["rows_true_columns_predicted"], out)
    return metrics, images


def _segmentation(predictor: Predictor, items: Sequence[dict[str, Any]],
                  out: Path) -> tuple[dict[str, Any], list[Path]]:
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    classes = predictor.pipeline.classes
    dice_rows, hd_rows = [], []
    for batch, logits, label in predictor.run_items(items, batch_size=1):
        spacing = np.linalg.norm(np.asarray(batch["image"].affine[0])[:3, :3], axis=0)
        pred = one_hot(logits.argmax(dim=1, keepdim=True), len(classes))
        truth = one_hot(label.long(), len(classes))
        dice_rows.append(compute_dice(pred, truth, include_background=False).numpy()[0])
        hd_rows.append(compute_hausdorff_distance(pred, truth, include_background=False,
                                                  percentile=95, spacing=spacing.tolist())
                       .numpy()[0])
    dice, hd95 = np.array(dice_rows, dtype=float), np.array(hd_rows, dtype=float)
    metrics = segmentation_metrics(dice, hd95, classes[1:])
    with (out / "cases.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", *[f"dice_{c}" for c in classes[1:]],
                         *[f"hd95_{c}" for c in classes[1:]]])
        for item, d, h in zip(items, dice, hd95, strict=True):
            writer.writerow([item["image"], *[f"{v:.4f}" for v in d], *[f"{v:.2f}" for v in h]])
    return metrics, [dice_boxplot(dice, classes[1:], out)]


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        lo, hi = value["ci95"]
        return f"{value['value']:.4f} <small>(95% CI {lo:.4f}&ndash;{hi:.4f})</small>"
    return html.escape(json.dumps(value))


def _html(metrics: dict[str, Any], images: list[Path]) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict) and "value" in value:
            rows.append(f"<tr><th>{html.escape(key)}</th><td>{_cell(value)}</td></tr>")
        elif key.endswith("_per_class"):
            for name, item in value.items():
                rows.append(f"<tr><th>{html.escape(key)} {html.escape(name)}</th>"
                            f"<td>{_cell(item)}</td></tr>")
    pipeline = metrics["pipeline"]
    figures = "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
                      for p in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(pipeline['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}td,th{{padding:.2em .8em;text-align:left}}
img{{max-width:32%;margin:.3em}}</style></head><body>
<h1>Evaluation of {html.escape(pipeline['name'])} {html.escape(pipeline['version'])}</h1>
<p>{metrics['n']} cases. Weights SHA-256 <code>{pipeline['weights_sha256'][:16]}…</code>,
calibration temperature {pipeline['temperature']:.3f}. Intervals are bootstrap 95% percentile
intervals over cases.{f" {len(metrics['skipped_items'])} unreadable item(s) skipped: "
+ html.escape("; ".join(i["path"] for i in metrics["skipped_items"][:10])) + "."
if metrics.get("skipped_items") else ""}</p>
<table>{''.join(rows)}</table>
<div>{figures}</div>
<p><strong>Research use only; not for diagnostic use.</strong></p>
</body></html>
"""
