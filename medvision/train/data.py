"""Finding labelled items in a data folder and splitting them reproducibly, by patient."""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError, DataLayoutError
from medvision.io import read_volume

__all__ = ["DataSplit", "discover_items", "pipeline_split", "readable_items", "split_items"]

log = logging.getLogger(__name__)

Item = dict[str, Any]


@dataclass(frozen=True)
class DataSplit:
    """Training and validation items; each item has ``image``, ``label`` and ``group``."""

    train: tuple[Item, ...]
    val: tuple[Item, ...]
    fold: int | None = None
    """The cross-validation fold held out as ``val`` (None: a plain hold-out split)."""


def _group(name: str, pattern: str | None) -> str:
    if pattern:
        match = re.search(pattern, name)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return name


def discover_items(pipeline: Pipeline, data: str | os.PathLike[str], *,
                   split: str = "train") -> list[Item]:
    """Every labelled item under ``data`` for the pipeline's layout.

    Args:
        pipeline: the pipeline (classes, layout, grouping rule).
        data: a folder (class folders, or ``images``/``labels``) or a ``.npz`` file.
        split: for ``.npz`` files, which official split to read (``train``, ``val``, ``test``).

    Raises:
        DataError: missing folders, unknown classes, unpaired images, or no items.
    """
    root = Path(data)
    cfg = pipeline.data
    items: list[Item] = []
    if cfg.layout == "npz":
        try:
            archive = np.load(root)
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{root}: cannot read split '{split}' from the .npz ({e})") from e
        for index, (image, label) in enumerate(zip(images, np.asarray(labels).reshape(-1),
                                                   strict=True)):
            items.append({"image": image, "label": int(label), "group": f"{split}-{index}"})
    elif cfg.layout == "class_folders":
        if not root.is_dir():
            raise DataLayoutError(f"{root}: data folder not found")
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        unknown = set(present) - set(pipeline.classes)
        if unknown:
            raise DataLayoutError(f"{root}: folders {sorted(unknown)} are not classes of the pipeline "
                            f"({', '.join(pipeline.classes)})")
        for label, name in enumerate(pipeline.classes):
            folder = root / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name.lower().endswith(cfg.extensions):
                    items.append({"image": str(path), "label": label,
                                  "group": _group(path.name, cfg.group_pattern)})
    else:
        images, labels = root / "images", root / "labels"
        if not images.is_dir() or not labels.is_dir():
            raise DataLayoutError(f"{root}: expected 'images/' and 'labels/' folders")
        for path in sorted(images.iterdir()):
            if not path.name.lower().endswith(cfg.extensions) or path.name.startswith("."):
                continue
            label = labels / path.name
            if not label.is_file():
                raise DataError(f"{path}: no label file {label}")
            items.append({"image": str(path), "label": str(label),
                          "group": _group(path.name, cfg.group_pattern)})
    if not items:
        raise DataLayoutError(f"{root}: no items found for layout '{cfg.layout}'")
    return items


def split_items(pipeline: Pipeline, items: list[Item], *, fold: int | None = None) -> DataSplit:
    """Split by group (patient), stratified by class for classification; reproducible.

    Every item of one group lands on the same side. Without ``fold`` the validation side gets
    about ``data.val_fraction`` of each class's groups (at least one when a class has two or
    more). With ``fold`` (cross-validation, ``training.folds`` = k) each class's groups are
    shuffled with ``data.split_seed`` and dealt round-robin into k folds; fold ``fold`` is the
    validation side, the others train. Over the k folds every group is validated exactly once.

    Raises:
        ConfigError: ``fold`` without ``training.folds``, or out of range.
        DataError: a side would be empty.
    """
    folds = pipeline.training.folds
    if fold is not None and (folds is None or not 0 <= fold < folds):
        raise ConfigError(f"pipeline '{pipeline.name}': fold {fold} needs training.folds "
                          f"greater than it (now {folds}); folds count from 0")
    by_class: dict[Any, list[str]] = defaultdict(list)
    group_class: dict[str, Any] = {}
    for item in items:
        key = item["label"] if pipeline.task == "classification" else 0
        if item["group"] not in group_class:
            group_class[item["group"]] = key
            by_class[key].append(item["group"])
    rng = random.Random(pipeline.data.split_seed)
    val_groups: set[str] = set()
    for n, key in enumerate(sorted(by_class, key=str)):
        groups = sorted(by_class[key])
        rng.shuffle(groups)
        if fold is not None and folds is not None:
            # deal on from where the previous class stopped, so small classes do not all
            # land in fold 0
            offset = sum(len(by_class[k]) for k in sorted(by_class, key=str)[:n])
            val_groups.update(g for j, g in enumerate(groups) if (j + offset) % folds == fold)
            continue
        count = round(len(groups) * pipeline.data.val_fraction)
        if len(groups) >= 2:
            count = min(max(count, 1), len(groups) - 1)
        val_groups.update(groups[:count])
    train = tuple(i for i in items if i["group"] not in val_groups)
    val = tuple(i for i in items if i["group"] in val_groups)
    if not train or not val:
        raise DataError(f"cannot split {len(items)} items into training and validation; "
                        "add data or change data.val_fraction" if fold is None else
                        f"fold {fold} of {folds} is empty on one side: too few groups")
    if pipeline.task == "classification":
        _check_shares(pipeline, items, val, wanted=pipeline.data.val_fraction if fold is None
                      else 1 / (folds or 1))
    return DataSplit(train=train, val=val, fold=fold)


#: How far a class's share of validation items may stray from the split's before a warning.
SHARE_TOLERANCE = 0.15


def _check_shares(pipeline: Pipeline, items: Sequence[Item], val: Sequence[Item], *,
                  wanted: float) -> list[str]:
    """Warn when a class's items are not on both sides about as the split wants (groups too
    large or too few for the split to be fair: a patient key that is really a source or a
    class prefix); returns the warnings."""
    total = Counter(int(i["label"]) for i in items)
    held = Counter(int(i["label"]) for i in val)
    problems = []
    for label, count in sorted(total.items()):
        share = held.get(label, 0) / count
        if count >= 10 and abs(share - wanted) > SHARE_TOLERANCE:
            name = pipeline.classes[label] if label < len(pipeline.classes) else str(label)
            problems.append(f"class {name}: {share:.0%} of its {count} items validate "
                            f"(wanted about {wanted:.0%})")
    if problems:
        log.warning("the split cannot keep each class's share on both sides (%s): its groups "
                    "are too large or too few (data.group_pattern %r); validation will "
                    "mislead; use a patient key that gives many small groups, or none",
                    "; ".join(problems), pipeline.data.group_pattern)
    return problems


def pipeline_split(pipeline: Pipeline, data: str | os.PathLike[str], *,
                   fold: int | None = None) -> DataSplit:
    """The training/validation split ``train``, ``evaluate --split`` and ``publish`` share: an
    ``npz`` file's official train/val split, else :func:`split_items`. With ``fold``, an
    ``npz`` file's train and val are pooled and split into the folds.

    Raises:
        ConfigError: a bad ``fold``.
        DataError: no items, or a side would be empty.
    """
    if pipeline.data.layout == "npz":
        train = discover_items(pipeline, data, split="train")
        val = discover_items(pipeline, data, split="val")
        if fold is None:
            return DataSplit(train=tuple(train), val=tuple(val))
        return split_items(pipeline, train + val, fold=fold)
    return split_items(pipeline, discover_items(pipeline, data), fold=fold)


def readable_items(items: Sequence[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Keep the items whose files read; the others are skipped, each with a warning.

    Every image (and, for segmentation, label) path is read once through
    :func:`medvision.io.read_volume`, as training will read it, so a corrupt file is found
    before the first epoch instead of an hour into training.

    Returns:
        The readable items, and ``(path, reason)`` for each skipped one.
    """
    kept: list[Item] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        problem = None
        for key in ("image", "label"):
            value = item.get(key)
            if not isinstance(value, str):
                continue
            try:
                read_volume(value)
            except DataError as e:
                problem = (value, str(e))
                break
        if problem is None:
            kept.append(item)
        else:
            log.warning("skipping an unreadable item: %s", problem[1])
            skipped.append(problem)
    return kept, skipped
