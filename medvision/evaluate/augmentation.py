"""Does synthetic data help a scarce class? (``medvision synthesize experiment``)

One folder, every step resumable and skipped once done:

1. ``split.json``: the pipeline's split (an ``.npz`` file's official one, else by patient);
   with ``keep_fraction`` only that share of the scarce class's training patients is kept,
   to make it scarce on purpose. The held-out side is untouched.
2. ``generator/``: a class-conditional diffusion model trained on that training side only
   (``medvision synthesize train``), unless one is given.
3. ``synthetic/<scarce>/``: enough synthetic images to bring the scarce class up to the
   largest class (or ``synthetic_count``), each carrying ``synthetic: true``.
4. ``baseline/`` and ``augmented/``: the same pipeline, seed and epochs, trained without and
   with the synthetic images; the last epoch's weights are compared (nothing is selected on
   the evaluation split).
5. ``comparison.json`` / ``comparison.md``: on the same held-out items, each arm's recall of
   the scarce class, balanced accuracy and AUC, and the paired difference (augmented minus
   baseline) with a stratified BCa bootstrap 95% interval over cases.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.atomic import write_text_atomic
from medvision.audit.records import Auditor, items_digest
from medvision.config import Pipeline, config_hash
from medvision.errors import ConfigError
from medvision.metrics import (
    Statistic,
    auc_statistic,
    balanced_accuracy_statistic,
    bootstrap_interval,
    paired_difference,
    recall_statistic,
)

__all__ = ["Comparison", "compare_predictions", "run_experiment"]

log = logging.getLogger(__name__)

Item = dict[str, Any]
METRICS = ("scarce_recall", "balanced_accuracy", "auc")


@dataclass(frozen=True)
class Comparison:
    """The result of one augmentation experiment (``comparison.json``)."""

    pipeline: str
    scarce: str
    evaluation: str
    n_evaluation: dict[str, int]
    n_training: dict[str, int]
    n_synthetic: int
    baseline: dict[str, dict[str, Any]]
    augmented: dict[str, dict[str, Any]]
    difference: dict[str, dict[str, Any]]
    """Augmented minus baseline, paired over the same cases."""
    minutes: dict[str, float]


def _scores(probs: np.ndarray, labels: np.ndarray, scarce: int) -> dict[str, Statistic]:
    predicted = probs.argmax(axis=1)
    return {"scarce_recall": recall_statistic(predicted, labels, scarce),
            "balanced_accuracy": balanced_accuracy_statistic(predicted, labels, probs.shape[1]),
            "auc": auc_statistic(probs, labels)}


def compare_predictions(baseline: np.ndarray, augmented: np.ndarray, labels: np.ndarray, *,
                        scarce: int, seed: int = 0
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                   dict[str, dict[str, Any]]]:
    """Each arm's metrics and their paired differences (augmented minus baseline), every one
    with a stratified BCa bootstrap 95% interval over the same resampled cases.

    ``baseline``/``augmented``: class probabilities ``(N, K)`` on the same cases.
    """
    labels = np.asarray(labels, dtype=int)
    strata = [np.flatnonzero(labels == c) for c in range(baseline.shape[1])]
    first, second = _scores(baseline, labels, scarce), _scores(augmented, labels, scarce)
    arms: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = ({}, {})
    difference: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        for arm, scores in zip(arms, (first, second), strict=True):
            arm[name] = bootstrap_interval(scores[name], strata, seed=seed)
        difference[name] = bootstrap_interval(paired_difference(first[name], second[name]), strata,
                                              seed=seed)
    return arms[0], arms[1], difference


def _probabilities(pipeline: Pipeline, weights: Path, items: Sequence[Item]) -> np.ndarray:
    import torch

    from medvision.models import build_model, load_weights
    from medvision.transforms import build_transforms

    model = build_model(pipeline)
    load_weights(model, weights)
    model.eval()
    transform = build_transforms(pipeline, train=False)
    out = []
    with torch.no_grad():
        for start in range(0, len(items), 32):
            batch = torch.stack([torch.as_tensor(transform({"image": i["image"]})["image"])
                                 for i in items[start:start + 32]])
            out.append(torch.softmax(model(batch).float(), dim=1).numpy())
    return np.concatenate(out)


def _trained(run: Path) -> bool:
    return (run / "calibration.json").is_file() and (run / "last.safetensors").is_file()


def _train_arm(pipeline: Pipeline, split: Any, run: Path, auditor: Auditor | None) -> float:
    from medvision.train import train

    if _trained(run):
        return 0.0
    started = time.perf_counter()
    train(pipeline, split, run, resume=(run / "state.json").is_file(), progress=False,
          auditor=auditor)
    return (time.perf_counter() - started) / 60


def _counts(pipeline: Pipeline, items: Sequence[Item]) -> dict[str, int]:
    labels = np.bincount([int(i["label"]) for i in items], minlength=len(pipeline.classes))
    return {c: int(n) for c, n in zip(pipeline.classes, labels, strict=True)}


def run_experiment(pipeline: Pipeline, data: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str], *, scarce: str,
                   keep_fraction: float | None = None, synthetic_count: int | None = None,
                   generator: str | os.PathLike[str] | None = None,
                   generator_classes: Sequence[str] | None = None,
                   generator_minutes: float | None = None, evaluation: str = "val",
                   sample_seed: int = 0, auditor: Auditor | None = None) -> Comparison:
    """Train ``pipeline`` with and without synthetic ``scarce`` images and compare them on the
    same held-out items (see the module description for the steps and files).

    Args:
        evaluation: ``val`` (the held-out side of the split) or, for an ``.npz`` file,
            ``test`` (its official test split).
        generator: an already trained generator run folder (its training items must be the
            experiment's training side); default ``OUT/generator``, trained here.
        generator_classes: train the generator on these classes only (default: all).
        auditor: where both classifier trainings are recorded (the augmented one with its
            count of synthetic items).

    Raises:
        ConfigError: an unknown class or evaluation, a generator trained on other items, or a
            folder holding another experiment.
    """
    from medvision.models import weights_sha256
    from medvision.train import pipeline_split
    from medvision.train.data import DataSplit, discover_items
    from medvision.train.synthesize import (
        GENERATOR_FILE,
        generator_training_items,
        sample,
        scarce_split,
        train_generator,
    )

    if scarce not in pipeline.classes:
        raise ConfigError(f"unknown class '{scarce}'; the pipeline has {list(pipeline.classes)}")
    if evaluation not in ("val", "test") or (evaluation == "test"
                                             and pipeline.data.layout != "npz"):
        raise ConfigError(f"evaluation '{evaluation}': 'val', or 'test' for an .npz file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    minutes: dict[str, float] = {}
    split = pipeline_split(pipeline, data)
    if keep_fraction is not None:
        split = scarce_split(pipeline, split, scarce, keep_fraction)
    evaluation_items = list(split.val) if evaluation == "val" else discover_items(
        pipeline, data, split="test")
    record = {"pipeline": pipeline.name, "config_hash": config_hash(pipeline),
              "scarce": scarce, "keep_fraction": keep_fraction,
              "train": {**items_digest(split.train), "per_class": _counts(pipeline, split.train)},
              "evaluation": {"split": evaluation, **items_digest(evaluation_items),
                             "per_class": _counts(pipeline, evaluation_items)}}
    if (out / "split.json").is_file():
        before = json.loads((out / "split.json").read_text())
        if before != record:
            raise ConfigError(f"{out}: holds an experiment on other data or settings "
                              "(split.json differs); choose a new folder")
    else:
        write_text_atomic(out / "split.json", json.dumps(record, indent=1))

    unknown = set(generator_classes or ()) - set(pipeline.classes)
    if unknown:
        raise ConfigError(f"generator classes {sorted(unknown)} are not classes of "
                          f"{pipeline.name}")
    wanted = {pipeline.classes.index(c) for c in generator_classes or pipeline.classes}
    generator_items = [i for i in split.train if int(i["label"]) in wanted]
    run = Path(generator) if generator is not None else out / "generator"
    if generator is None and not (run / "generator.json").is_file():
        started = time.perf_counter()
        train_generator(pipeline, generator_items, run, resume=(run / "state.json").is_file(),
                        max_minutes=generator_minutes)
        minutes["generator"] = (time.perf_counter() - started) / 60
    recorded = generator_training_items(pipeline, run, data)
    if items_digest(recorded) != items_digest(generator_items):
        raise ConfigError(f"{run}: the generator was trained on other items than this "
                          "experiment's training side")

    counts = _counts(pipeline, split.train)
    count = synthetic_count if synthetic_count is not None else max(
        0, max(counts.values()) - counts[scarce])
    synthetic_dir = out / "synthetic"
    done = synthetic_dir / "provenance.json"
    made = json.loads(done.read_text()) if done.is_file() else {}
    if (made.get("per_class") != count
            or made.get("generator_sha256") != weights_sha256(run / GENERATOR_FILE)):
        started = time.perf_counter()
        sample(pipeline, run, synthetic_dir, per_class=count, seed=sample_seed,
               classes=[scarce])
        minutes["sampling"] = (time.perf_counter() - started) / 60
    synthetic = [{"image": str(p), "label": pipeline.classes.index(scarce),
                  "group": f"synthetic-{p.name}"}
                 for p in sorted((synthetic_dir / scarce).iterdir())
                 if p.name.endswith((".png", ".nii.gz"))]

    minutes["baseline"] = _train_arm(pipeline, split, out / "baseline", auditor)
    augmented_split = DataSplit(train=tuple(split.train) + tuple(synthetic), val=split.val)
    minutes["augmented"] = _train_arm(pipeline, augmented_split, out / "augmented",
                                     auditor)

    labels = np.array([int(i["label"]) for i in evaluation_items])
    probs = {arm: _probabilities(pipeline, out / arm / "last.safetensors", evaluation_items)
             for arm in ("baseline", "augmented")}
    np.savez(out / "probabilities.npz", labels=labels, baseline=probs["baseline"],
             augmented=probs["augmented"])
    base, aug, diff = compare_predictions(probs["baseline"], probs["augmented"], labels,
                                          scarce=pipeline.classes.index(scarce))
    comparison = Comparison(
        pipeline=pipeline.name, scarce=scarce, evaluation=evaluation,
        n_evaluation=_counts(pipeline, evaluation_items), n_training=counts,
        n_synthetic=len(synthetic), baseline=base, augmented=aug, difference=diff,
        minutes=_minutes(out, minutes))
    write_text_atomic(out / "comparison.json", json.dumps(asdict(comparison), indent=1))
    write_text_atomic(out / "comparison.md", comparison_markdown(comparison))
    return comparison


def _minutes(out: Path, now: dict[str, float]) -> dict[str, float]:
    """Minutes per step: those that ran now, else what an earlier run of the folder spent."""
    before: dict[str, float] = {}
    if (out / "comparison.json").is_file():
        before = json.loads((out / "comparison.json").read_text()).get("minutes", {})
    return {**before, **{k: round(v, 2) for k, v in now.items() if v > 0}}


def _cell(entry: dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    low, high = entry["ci95"]
    return f"{fmt.format(entry['value'])} ({fmt.format(low)} to {fmt.format(high)})"


def comparison_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table (``comparison.md``)."""
    names = {"scarce_recall": f"recall of {c.scarce}", "balanced_accuracy": "balanced accuracy",
             "auc": "AUC"}
    lines = [f"{c.pipeline}: training {c.n_training} + {c.n_synthetic} synthetic {c.scarce}; "
             f"evaluated on {c.evaluation} {c.n_evaluation}.", "",
             "| metric | baseline | with synthetic | difference (paired 95% CI) |",
             "|---|---|---|---|"]
    for key in METRICS:
        lines.append(f"| {names[key]} | {_cell(c.baseline[key])} | {_cell(c.augmented[key])} "
                     f"| {_cell(c.difference[key], signed=True)} |")
    return "\n".join(lines) + "\n"
