"""``medvision plan``: look at a dataset and write a pipeline file that trains within a time
budget on this machine.

What nnU-Net's experiment planning does for segmentation on a GPU, for classification,
segmentation and detection on a CPU budget:

1. **Fingerprint** the data: layout and task, classes and their balance, image sizes, spacings,
   channels (colour or grey stored as colour), intensity ranges (from a sample read with the
   same readers training uses), the likely patient key in file names (a regular expression
   tried against every name), and exact duplicate files within and across classes.
2. **Choose** the preprocessing (orientation, intensity normalisation, size), network,
   loss, batch size and augmentation from the fingerprint, with rules written out in the file.
3. **Measure**: a short timing run on real items of this dataset through the real transforms,
   network, loss and optimizer: seconds to load and preprocess an item (paid once, then
   cached), per training step, per validation batch. The epochs are what fits the budget
   after caching; when fewer than a useful minimum fit, a smaller input size is measured.
   On a CPU with native bfloat16 the first size's steps are also timed in bfloat16, and
   ``training.precision: bfloat16`` is planned when they are at least 1.15x faster.

The file's comments carry the fingerprint, the measurements and the reasoning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError, DataLayoutError
from medvision.train.precision import bfloat16_native
from medvision.vocabulary import Task

__all__ = ["Fingerprint", "Plan", "fingerprint", "plan_pipeline"]

log = logging.getLogger(__name__)

#: Patient-key patterns tried against file names, most specific first.
GROUP_PATTERNS = (
    r"^(NORMAL2-IM-\d+|IM-\d+|person\d+)",
    r"^(person\d+)",
    r"^((?:patient|pat|subject|sub|case)[-_]?\d+)",
    r"^([A-Za-z]+[-_]?\d+)[-_]",
    r"^(.+?)[-_]\d+\.[A-Za-z.]+$",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii.gz", ".nii", ".dcm", ".mha", ".nrrd", ".tif",
                   ".tiff", ".bmp")


@dataclass(frozen=True)
class Fingerprint:
    """What ``plan`` found in the data."""

    root: str
    layout: str
    task: Task
    classes: tuple[str, ...]
    counts: dict[str, int]
    items: int
    sampled: int
    spatial_dims: int
    median_shape: tuple[int, ...]
    min_shape: tuple[int, ...]
    median_spacing: tuple[float, ...]
    channels: int
    grey_as_colour: bool
    intensity: dict[str, float]
    group_pattern: str | None
    groups: int
    duplicates: dict[str, int]
    extensions: tuple[str, ...]
    rejected_patterns: tuple[str, ...] = ()
    """Patient keys tried and rejected as implausible, each with why."""

    def lines(self) -> list[str]:
        """The fingerprint as comment lines."""
        balance = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        shape = "x".join(map(str, self.median_shape))
        return [
            f"data: {self.root} ({self.layout}), {self.items} items; {balance}",
            f"sampled {self.sampled}: median size {shape} (smallest "
            f"{'x'.join(map(str, self.min_shape))}), median spacing "
            f"{'x'.join(f'{s:.3g}' for s in self.median_spacing)} mm, {self.channels} channel(s)"
            + (" (grey stored as colour)" if self.grey_as_colour else ""),
            "intensity: " + ", ".join(f"{k} {v:.4g}" for k, v in self.intensity.items()),
            (f"patient key in file names: {self.group_pattern!r} ({self.groups} groups)"
             if self.group_pattern else "no patient key found in file names: every file is "
             "its own group (check that no patient has several files)"),
            *(f"rejected as a patient key: {why}" for why in self.rejected_patterns),
            "exact duplicate files: " + (", ".join(f"{k} {v}" for k, v in
                                                    self.duplicates.items()) or "none"),
        ]


@dataclass(frozen=True)
class Plan:
    """A planned pipeline: its settings, the measurements and the reasons."""

    settings: dict[str, Any]
    fingerprint: Fingerprint
    timing: dict[str, float]
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def yaml(self) -> str:
        """The pipeline file, with the fingerprint and reasoning as comments."""
        import yaml

        head = ["# Written by `medvision plan`: check it before relying on it.", "#",
                "# Fingerprint:"]
        head += [f"#   {line}" for line in self.fingerprint.lines()]
        head += ["#", "# Timing run on this machine (seconds):"]
        head += [f"#   {k}: {v:.3g}" for k, v in self.timing.items()]
        head += ["#", "# Reasoning:"]
        head += [f"#   - {line}" for line in self.reasons]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.settings, sort_keys=False)


def _detect_layout(root: Path) -> str:
    if root.is_file() and root.suffix == ".npz":
        return "npz"
    if (root / "Annotations").is_dir() or (root / "annotations.xml").exists():
        return "voc"
    if any(p.suffix == ".json" for p in root.glob("*.json")) and (root / "images").is_dir() \
            and not (root / "labels").is_dir():
        return "coco"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "image_label_folders"
    if (root / "boxes.csv").is_file():
        return "csv"
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return "class_folders"
    raise DataLayoutError(f"{root}: cannot tell the layout (class folders, images/ + labels/, VOC, "
                    "COCO, boxes.csv or an .npz file)")


_TASK_OF_LAYOUT = {"class_folders": Task.CLASSIFICATION, "npz": Task.CLASSIFICATION,
                   "image_label_folders": Task.SEGMENTATION, "voc": Task.DETECTION,
                   "coco": Task.DETECTION, "csv": Task.DETECTION}


def _suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in _IMAGE_SUFFIXES if lower.endswith(s)), "")


#: A patient key is rejected when one of its groups holds more than this share of a class's
#: files (a patient is a few files; a source collection or a class prefix is many).
MAX_GROUP_SHARE = 0.1


def _guess_group(names: list[str], classes: Sequence[str] | None = None
                 ) -> tuple[str | None, int, list[str]]:
    """The first pattern that matches every name and gives plausible patient groups: more
    than one group, at least ten (or half the files, for small sets), and none holding more
    than :data:`MAX_GROUP_SHARE` of a class's files (of classes with 20 files or more).

    ``classes``: each name's class (None: one class). Returns the pattern (None: every file
    its own group, which is harmless), the number of groups, and why each pattern that
    matched was rejected.
    """
    labels = list(classes) if classes is not None else ["all"] * len(names)
    per_class = Counter(labels)
    rejected: list[str] = []
    for pattern in GROUP_PATTERNS:
        keys = []
        for name in names:
            match = re.search(pattern, name)
            if match is None:
                break
            keys.append(match.group(1) if match.groups() else match.group(0))
        else:
            groups = len(set(keys))
            if groups < 2:
                continue
            if groups < min(10, len(names) // 2):
                rejected.append(f"{pattern!r}: {groups} groups for {len(names)} files")
                continue
            sizes = Counter(zip(labels, keys, strict=True))
            (label, key), size = max(sizes.items(), key=lambda kv: kv[1] / per_class[kv[0][0]])
            share = size / per_class[label]
            if per_class[label] >= 20 and share > MAX_GROUP_SHARE:
                rejected.append(f"{pattern!r}: group {key!r} holds {size} of the "
                                f"{per_class[label]} files of class {label} ({share:.0%}), "
                                f"more than a patient; {groups} groups for {len(names)} files")
                continue
            return pattern, groups, rejected
    return None, len(names), rejected


def _duplicates(paths_by_class: dict[str, list[Path]]) -> dict[str, int]:
    """Exact duplicate files (same bytes) within a class and across classes."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for name, paths in paths_by_class.items():
        for path in paths:
            try:
                by_size[path.stat().st_size].append((name, path))
            except OSError:
                continue
    within = across = 0
    for candidates in by_size.values():
        if len(candidates) < 2:
            continue
        by_hash: dict[str, list[str]] = defaultdict(list)
        for name, path in candidates:
            by_hash[hashlib.sha256(path.read_bytes()).hexdigest()].append(name)
        for names in by_hash.values():
            if len(names) > 1:
                if len(set(names)) > 1:
                    across += len(names) - 1
                else:
                    within += len(names) - 1
    found = {}
    if within:
        found["within a class"] = within
    if across:
        found["across classes (contradictory labels)"] = across
    return found


def _draft(task: Task, layout: str, classes: tuple[str, ...], *, spatial_dims: int,
           in_channels: int, extensions: tuple[str, ...], group_pattern: str | None) -> Pipeline:
    settings = {"name": "draft", "task": str(task), "spatial_dims": spatial_dims,
                "in_channels": in_channels, "classes": list(classes),
                "data": {"layout": layout, "extensions": list(extensions),
                         "group_pattern": group_pattern},
                "model": {"name": "retinanet" if task == Task.DETECTION else "unet"
                          if task == Task.SEGMENTATION else "resnet18"}}
    return Pipeline.model_validate(settings)


def _box_classes(root: Path, layout: str) -> tuple[str, ...]:
    import json
    import xml.etree.ElementTree as ElementTree

    names: set[str] = set()
    if layout == "voc":
        for xml in sorted((root / "Annotations").glob("*.xml")):
            try:
                names.update(o.findtext("name", "").strip()
                             for o in ElementTree.parse(xml).getroot().iter("object"))
            except ElementTree.ParseError:
                continue
    elif layout == "coco":
        for path in root.glob("*.json"):
            try:
                names.update(c["name"] for c in json.loads(path.read_text())["categories"])
            except (OSError, ValueError, KeyError):
                continue
    else:
        import csv

        with (root / "boxes.csv").open() as handle:
            names.update(row["class"] for row in csv.DictReader(handle))
    names.discard("")
    if not names:
        raise DataLayoutError(f"{root}: no box classes found")
    return tuple(sorted(names))


def fingerprint(data: str | os.PathLike[str], *, task: str | None = None,
                sample: int = 64) -> tuple[Fingerprint, list[dict[str, Any]]]:
    """Inspect ``data``; returns the fingerprint and the items (for the timing run).

    Raises:
        DataError: no layout recognised, or no readable item.
        ConfigError: ``task`` does not fit the layout.
    """
    from medvision.io import read_volume
    from medvision.train.data import discover_items, readable_items

    root = Path(data)
    layout = _detect_layout(root)
    found_task = _TASK_OF_LAYOUT[layout]
    if task is not None and Task(task) != found_task:
        raise ConfigError(f"{root}: a {layout} layout is for {found_task}, not {task}")
    paths_by_class: dict[str, list[Path]] = {}
    if layout == "class_folders":
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()
                               and not p.name.startswith(".")))
        for name in classes:
            paths_by_class[name] = sorted(p for p in (root / name).iterdir()
                                          if p.is_file() and _suffix(p.name))
        names = [p.name for ps in paths_by_class.values() for p in ps]
    elif layout == "image_label_folders":
        paths_by_class["images"] = sorted(p for p in (root / "images").iterdir()
                                          if _suffix(p.name) and not p.name.startswith("."))
        names = [p.name for p in paths_by_class["images"]]
        classes = ()
    elif layout == "npz":
        classes, names = (), []
    else:
        classes = _box_classes(root, layout)
        names = []
    extensions = tuple(sorted({_suffix(n) for n in names} - {""})) or (
        ".png", ".jpg", ".jpeg", ".nii.gz", ".nii", ".dcm")
    name_classes = [c for c, ps in paths_by_class.items() for _ in ps] if names else []
    pattern, groups, rejected = _guess_group(names, name_classes) if names else (None, 0, [])
    for why in rejected:
        log.warning("plan: rejected as a patient key: %s", why)
    if layout == "image_label_folders":
        # classes from the label values of a few label files
        values: set[int] = set()
        for path in paths_by_class["images"][:8]:
            label = read_volume(root / "labels" / path.name)
            values.update(int(v) for v in np.unique(np.asarray(label.array)))
        classes = ("background", *(f"label{v}" for v in sorted(values - {0})))
    if layout == "npz":
        archive = np.load(root)
        labels = np.asarray(archive["train_labels"]).reshape(-1)
        classes = tuple(f"class{v}" for v in range(int(labels.max()) + 1))
    # read a spread sample with the training readers
    draft = _draft(found_task, layout, classes, spatial_dims=2, in_channels=1,
                   extensions=extensions, group_pattern=pattern)
    if found_task == Task.DETECTION:
        from medvision.train.boxes import detection_items

        items = detection_items(draft, root)
    else:
        items = discover_items(draft, root)
    step = max(1, len(items) // sample)
    chosen, _ = readable_items(items[::step][:sample])
    if not chosen:
        raise DataError(f"{root}: none of the sampled items could be read")
    shapes, spacings, channels, grey_as_colour, low, high = [], [], [], [], [], []
    for item in chosen:
        image = item["image"]
        if isinstance(image, np.ndarray):
            array = np.asarray(image, dtype=np.float32)[np.newaxis]
            spacing: tuple[float, ...] = (1.0,) * (array.ndim - 1)
        else:
            volume = read_volume(image)
            array, spacing = np.asarray(volume.array, dtype=np.float32), volume.spacing
        spatial = tuple(int(s) for s in array.shape[1:] if s > 1) or array.shape[1:]
        shapes.append(spatial)
        spacings.append(tuple(float(s) for s in spacing[: len(spatial)]))
        channels.append(array.shape[0])
        grey_as_colour.append(array.shape[0] == 3 and bool(
            np.allclose(array[0], array[1], atol=2) and np.allclose(array[1], array[2], atol=2)))
        low.append(float(np.percentile(array, 0.5)))
        high.append(float(np.percentile(array, 99.5)))
    dims = Counter(len(s) for s in shapes).most_common(1)[0][0]
    shapes = [s for s in shapes if len(s) == dims]
    median_shape = tuple(int(statistics.median(s[k] for s in shapes)) for k in range(dims))
    min_shape = tuple(min(s[k] for s in shapes) for k in range(dims))
    spacing_rows = [s for s in spacings if len(s) == dims] or [(1.0,) * dims]
    median_spacing = tuple(float(statistics.median(s[k] for s in spacing_rows))
                           for k in range(dims))
    if layout == "class_folders":
        counts = {name: len(paths) for name, paths in paths_by_class.items()}
    elif found_task == Task.CLASSIFICATION:
        counts = {classes[k]: n for k, n in sorted(Counter(int(i["label"]) for i in items).items())}
    elif found_task == Task.DETECTION:
        boxes = Counter(int(label) for item in items for label in item["labels"])
        counts = {classes[k]: boxes.get(k, 0) for k in range(len(classes))}
    else:
        counts = {"cases": len(items)}
    result = Fingerprint(
        root=str(root), layout=layout, task=found_task, classes=tuple(classes), counts=counts,
        items=len(items), sampled=len(chosen), spatial_dims=dims, median_shape=median_shape,
        min_shape=min_shape, median_spacing=median_spacing,
        channels=Counter(channels).most_common(1)[0][0],
        grey_as_colour=sum(grey_as_colour) > len(grey_as_colour) / 2,
        intensity={"min p0.5": min(low), "median p0.5": statistics.median(low),
                   "median p99.5": statistics.median(high), "max p99.5": max(high)},
        group_pattern=pattern, groups=groups, rejected_patterns=tuple(rejected),
        duplicates=_duplicates(paths_by_class) if layout == "class_folders" else {},
        extensions=extensions)
    return result, items


#: Input sizes tried, largest first, until the budget allows enough epochs.
_SIZES_2D = (256, 224, 192, 160, 128, 96, 64)
_SIZES_3D = (128, 96, 80, 64, 48, 32)
_BFLOAT16_GAIN = 1.15  # bfloat16 steps must be this much faster to be planned


def _round_size(shape: tuple[int, ...], cap: int, multiple: int) -> list[int]:
    """Each side rounded up to a multiple (a network's strides need it), at most ``cap``."""
    return [max(multiple, min(cap, math.ceil(s / multiple) * multiple)) for s in shape]


def _settings(fp: Fingerprint, name: str, size: list[int], epochs: int,
              batch: int, precision: str = "float32") -> dict[str, Any]:
    task = fp.task
    in_channels = 1 if fp.grey_as_colour or fp.channels == 1 else fp.channels
    if task == Task.DETECTION:
        in_channels = fp.channels
    intensity: dict[str, Any]
    if fp.intensity["min p0.5"] < -500:  # CT: Hounsfield units
        intensity = {"kind": "window", "a_min": -1000.0, "a_max": 1000.0}
    elif fp.spatial_dims == 3:
        intensity = {"kind": "zscore", "nonzero": True}
    else:
        intensity = {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    settings: dict[str, Any] = {
        "name": name, "version": "0.1.0",
        "description": f"planned by medvision plan from {fp.root}",
        "task": str(task), "spatial_dims": fp.spatial_dims, "in_channels": in_channels,
        "classes": list(fp.classes),
        "data": {"layout": fp.layout, "extensions": list(fp.extensions),
                 "group_pattern": fp.group_pattern, "val_fraction": 0.2, "split_seed": 0},
    }
    if fp.layout in ("npz", "voc", "coco", "csv"):
        settings["data"] = {"layout": fp.layout}
    if task == Task.DETECTION:
        settings["preprocess"] = {"size": size}
        settings["augment"] = {"prob": 0.5, "flip_axes": [0, 1], "rotate_degrees": 90,
                               "scale": 0.15, "gamma": [0.8, 1.25], "noise_std": 0.02}
        settings["model"] = {"name": "retinanet", "params": {"depth": 18, "conv1_stride": 2}}
        settings["optimizer"] = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001}
        settings["schedule"] = {"name": "cosine", "warmup_epochs": 1}
        settings["explanation"] = {"method": "saliency"}
    elif task == Task.SEGMENTATION:
        settings["preprocess"] = {"orientation": "RAS", "intensity": intensity, "size": size}
        settings["augment"] = {"prob": 0.5, "rotate_degrees": 10, "scale": 0.1,
                               "gamma": [0.8, 1.25], "noise_std": 0.05}
        settings["model"] = {"name": "unet", "params": {
            "channels": [16, 32, 64, 128] if fp.spatial_dims == 3 else [32, 64, 128, 256],
            "strides": [2, 2, 2], "num_res_units": 2}}
        settings["loss"] = {"name": "dice_ce"}
        settings["optimizer"] = {"name": "adamw", "lr": 0.002, "weight_decay": 0.00001}
        settings["schedule"] = {"name": "cosine", "warmup_epochs": 1}
        settings["explanation"] = {"method": "saliency"}
    else:
        settings["preprocess"] = {"intensity": intensity, "size": size}
        settings["augment"] = {"prob": 0.8, "rotate_degrees": 10, "scale": 0.1,
                               "translate_fraction": 0.05, "gamma": [0.8, 1.25],
                               "noise_std": 0.02}
        settings["model"] = {"name": "resnet18", "params": {"conv1_t_stride": 2}}
        settings["loss"] = {"name": "cross_entropy", "label_smoothing": 0.1}
        settings["optimizer"] = {"name": "adamw", "lr": 0.001, "weight_decay": 0.02}
        settings["schedule"] = {"name": "cosine", "warmup_epochs": 1}
        settings["explanation"] = {"method": "gradcam", "layer": "layer4"}
        settings["qc"] = {"feature_layer": "layer3"}
    balanced = task == Task.CLASSIFICATION and len(fp.counts) > 1 and (
        max(fp.counts.values()) > 1.5 * max(1, min(fp.counts.values())))
    settings["training"] = {"epochs": epochs, "batch_size": batch, "seed": 0,
                            "cache": "memory", "threads": os.cpu_count() or 1}
    if balanced:
        settings["training"]["balanced_sampling"] = True
    if precision != "float32":
        settings["training"]["precision"] = precision
    if task == Task.CLASSIFICATION and epochs >= 10:
        settings["training"]["swa_epochs"] = max(2, epochs // 5)
        settings["training"]["val_metric"] = "loss"
    return settings


def _time(pipeline: Pipeline, items: list[dict[str, Any]], *,
          also_bfloat16: bool = False, device: Any = "cpu") -> dict[str, float]:
    """Seconds per item to load and preprocess, per training step and per validation batch,
    measured on real items through the real transforms, network, loss and optimizer;
    ``also_bfloat16`` adds ``train_step_bfloat16``, the same steps under bfloat16 autocast
    (not for detection). Steps run on ``device`` (synchronised before each clock reading)."""
    import torch
    from monai.data import DataLoader, Dataset

    from medvision.devices import autocast, move, synchronize
    from medvision.models import build_model
    from medvision.train.loop import _loss, _optimizer, supervised_loss
    from medvision.transforms import build_transforms

    batch = pipeline.training.batch_size
    chosen = [dict(i) for i in items[: max(2 * batch, 4)]]
    if pipeline.task == Task.DETECTION:
        from medvision.models.detection import build_detector
        from medvision.train.detection import _collate, _device_inputs

        transform = build_transforms(pipeline, train=True)
        t0 = time.perf_counter()
        prepared = [transform(dict(i)) for i in chosen]
        # reading, scaling and augmenting: counted both for caching and (conservatively)
        # as each epoch's augmentation
        load = (time.perf_counter() - t0) / len(chosen)
        detector = build_detector(pipeline).to(device)
        optimizer = torch.optim.AdamW(detector.parameters(), lr=pipeline.optimizer.lr)
        batches = [_collate(prepared[k:k + batch]) for k in range(0, len(prepared), batch)]
        steps = []
        detector.train()
        for n, part in enumerate(batches * 2):
            synchronize(device)
            t0 = time.perf_counter()
            images, targets = _device_inputs(part, device)
            losses = detector(images, targets)
            loss = losses["classification"] + losses["box_regression"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            if n:
                steps.append(time.perf_counter() - t0)
        detector.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            detector(images)
        synchronize(device)
        val = (time.perf_counter() - t0)
        return {"load_per_item": load, "augment_per_item": load,
                "train_step": statistics.median(steps), "val_batch": val}
    data = [{k: v for k, v in i.items() if k != "group"} for i in chosen]
    deterministic = build_transforms(pipeline, train=False)
    deterministic(dict(data[0]))  # warm-up: first calls pay for imports and set-up
    timed = data[1:9] or data[:1]
    t0 = time.perf_counter()
    for item in timed:
        deterministic(dict(item))
    load = (time.perf_counter() - t0) / len(timed)
    loader = DataLoader(Dataset(data, transform=build_transforms(pipeline, train=True)),
                        batch_size=batch, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    loaded: list[Any] = list(loader)  # reading, preprocessing and the random augmentation
    # the deterministic part is cached after the first epoch; augmentation runs every epoch
    augment = max(0.0, (time.perf_counter() - t0) / len(data) - load)
    model = build_model(pipeline).to(device)
    loss_fn = _loss(pipeline).to(device)
    optimizer = _optimizer(pipeline, model.parameters())
    model.train()

    def step_seconds(timed: Pipeline) -> float:
        steps = []
        for n, part in enumerate(loaded * 2):
            synchronize(device)
            t0 = time.perf_counter()
            part = move(part, device)
            label = part["label"]
            if pipeline.task == Task.CLASSIFICATION:
                label = torch.as_tensor(label).long().reshape(-1)
            with autocast(device, timed.training.precision):
                output = model(part["image"])
            loss = supervised_loss(loss_fn, output.float(), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            if n:  # the first step pays for allocations
                steps.append(time.perf_counter() - t0)
        return statistics.median(steps)

    timing = {"train_step": step_seconds(pipeline)}
    if also_bfloat16:
        timing["train_step_bfloat16"] = step_seconds(pipeline.model_copy(update={
            "training": pipeline.training.model_copy(update={"precision": "bfloat16"})}))
    image = move(loaded[-1]["image"], device)
    model.eval()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(image)
    synchronize(device)
    return {"load_per_item": load, "augment_per_item": augment, **timing,
            "val_batch": time.perf_counter() - t0}


def plan_pipeline(data: str | os.PathLike[str], *, budget_minutes: float,
                  task: str | None = None, name: str = "planned",
                  sample: int = 64, device: str | None = "auto") -> Plan:
    """Fingerprint ``data``, then choose settings whose training fits ``budget_minutes``
    (training steps timed on ``device``, where the training will run).

    Raises:
        DeviceError: the device is not there.
        DataError: the data cannot be read.
        ConfigError: a task that does not fit the layout, or a budget too small for even one
            epoch at the smallest size tried.
    """
    import torch

    from medvision.devices import resolve_device

    target = resolve_device(device)
    fp, items = fingerprint(data, task=task, sample=sample)
    reasons = []
    if fp.duplicates.get("across classes (contradictory labels)"):
        reasons.append("some files are in two classes: remove them before training")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if fp.task == Task.DETECTION:
        sizes = [[int(s) // 2 for s in fp.median_shape], [int(s) // 3 for s in fp.median_shape],
                 [int(s) // 4 for s in fp.median_shape]]
        sizes = [[max(64, s - s % 16) for s in size] for size in sizes]
        batch = 4
        reasons.append("detection: RetinaNet (ResNet-18 with a stride-2 first convolution), "
                       "images scaled to a fraction of their median size so objects keep "
                       "most of their pixels")
    elif fp.spatial_dims == 3:
        top = math.ceil(max(fp.median_shape) / 16) * 16
        caps = [top] + [c for c in _SIZES_3D if c < top] or [32]
        sizes = [_round_size(fp.median_shape, cap, 16) for cap in caps]
        batch = 4 if fp.task == Task.SEGMENTATION else 16
        reasons.append(f"3D: the median volume rounded up to multiples of 16 (the network "
                       f"halves it three times), capped from {caps[0]} down until enough "
                       "epochs fit")
    else:
        start = min(fp.median_shape)
        caps = [c for c in _SIZES_2D if c <= start] or [min(_SIZES_2D)]
        sizes = [[c, c] for c in caps]
        batch = 32 if fp.task == Task.CLASSIFICATION else 8
        reasons.append(f"2D: square input, the largest of {list(caps)} that leaves enough "
                       "epochs (resizing beyond the median image size adds nothing)")
    budget_s = budget_minutes * 60.0
    n_items = fp.items
    n_train = int(n_items * (1 - 0.2))
    n_val = n_items - n_train
    minimum = 5 if fp.task != Task.SEGMENTATION else 10
    chosen = None
    precision = "float32"
    timed_items = items[:: max(1, len(items) // (2 * batch + 4))]
    for size in sizes:
        settings = _settings(fp, name, size, epochs=1, batch=batch, precision=precision)
        pipeline = Pipeline.model_validate(settings)
        # the first size decides: bfloat16 steps when this CPU makes them clearly faster
        compare = chosen is None and fp.task != Task.DETECTION and (
            bfloat16_native() if target.type == "cpu" else target.type == "cuda")
        timing = _time(pipeline, timed_items, also_bfloat16=compare, device=target)
        if compare:
            mixed = timing.pop("train_step_bfloat16")
            speedup = timing["train_step"] / max(mixed, 1e-9)
            if speedup >= _BFLOAT16_GAIN:
                precision = "bfloat16"
                timing["train_step"] = mixed
            reasons.append(f"training steps in {precision}: bfloat16 steps took "
                           f"{1 / speedup:.2f}x the time of float32 ones here (bfloat16 is "
                           f"used from {_BFLOAT16_GAIN:g}x faster)")
        per_epoch = (math.ceil(n_train / batch) * timing["train_step"]
                     + n_train * timing["augment_per_item"]
                     + math.ceil(n_val / batch) * timing["val_batch"])
        cache = n_items * timing["load_per_item"]
        # 85 %: checkpoints, calibration, the guard and a busy machine take the rest
        epochs = int((0.85 * budget_s - cache) // per_epoch) if per_epoch > 0 else 0
        timing = {**timing, "epoch_estimate": per_epoch, "cache_estimate": cache}
        log.info("size %s: %.1f s/epoch, %.0f s caching, %d epoch(s) fit", size, per_epoch,
                 cache, epochs)
        chosen = (size, epochs, timing)
        if epochs >= minimum:
            break
    assert chosen is not None
    size, epochs, timing = chosen
    if epochs < 1:
        raise ConfigError(f"a {budget_minutes:g}-minute budget does not fit one epoch even at "
                          f"{size} ({timing['epoch_estimate']:.0f} s per epoch and "
                          f"{timing['cache_estimate']:.0f} s to cache); give more time")
    epochs = min(epochs, 200)
    reasons.append(f"size {size}: one epoch over {n_train} training and {n_val} validation "
                   f"items takes about {timing['epoch_estimate']:.0f} s here and caching "
                   f"{timing['cache_estimate']:.0f} s, so {epochs} epoch(s) fit 85% of "
                   f"{budget_minutes:g} minutes" + ("" if epochs >= minimum else
                                                    f" (fewer than the {minimum} wanted)"))
    if fp.grey_as_colour:
        reasons.append("the colour images are grey (three equal channels): one input channel")
    for why in fp.rejected_patterns:
        reasons.append(f"not a patient key, rejected: {why}")
    if fp.group_pattern is None and fp.layout in ("class_folders", "image_label_folders"):
        reasons.append("no patient key: the validation split is by file, which overstates "
                       "accuracy if a patient has several files; set data.group_pattern")
    settings = _settings(fp, name, size, epochs=epochs, batch=batch, precision=precision)
    if settings["training"].get("balanced_sampling"):
        reasons.append("classes are unbalanced (largest more than 1.5 times the smallest): "
                       "balanced sampling")
    if settings["training"].get("swa_epochs"):
        reasons.append(f"the last {settings['training']['swa_epochs']} epochs are averaged "
                       "(SWA), selected by validation loss")
    Pipeline.model_validate(settings)  # what is written must load
    return Plan(settings=settings, fingerprint=fp, timing=timing, reasons=tuple(reasons))
