"""Detection data: boxes from Pascal VOC XML, COCO JSON or a CSV, with official splits.

Every item is ``{"image": path, "boxes": (N, 4) float32, "labels": (N,) int64, "group": ...}``
with boxes as ``[x1, y1, x2, y2]`` in pixels of the image as stored: ``x`` along a row (the
image's ``I`` axis in medvision's layout), ``y`` down the rows (``J``), corners at pixel edges
(a box from x1 = 0 to x2 = 10 covers pixels 0-9). Labels index the pipeline's ``classes``.

Layouts (``data.layout``):

* ``voc``: ``DIR/JPEGImages/*.jpg`` and ``DIR/Annotations/*.xml`` (Pascal VOC; VOC's 1-based
  inclusive pixel corners become 0-based edges); official splits from ``DIR/train.txt``,
  ``DIR/val.txt`` (``DIR/ImageSets/Main/`` also) when present.
* ``coco``: ``DIR/annotations.json`` (or ``DIR/<split>.json``) with images beside it or in
  ``DIR/images/``; ``bbox`` is ``[x, y, width, height]``.
* ``csv``: ``DIR/boxes.csv`` with ``file,class,x1,y1,x2,y2`` rows (an image without boxes:
  one row with an empty class); optional ``split`` column.
"""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import DataError, DataLayoutError

__all__ = ["detection_items"]

Item = dict[str, Any]


def _item(image: Path, boxes: list[list[float]], labels: list[int]) -> Item:
    return {"image": str(image), "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64), "group": image.stem}


def _class_index(classes: Sequence[str], name: str, where: str) -> int:
    lookup = {c.lower(): k for k, c in enumerate(classes)}
    if name.strip().lower() not in lookup:
        raise DataError(f"{where}: class '{name}' is not one of the pipeline's "
                        f"({', '.join(classes)})")
    return lookup[name.strip().lower()]


def _split_names(root: Path, split: str) -> set[str] | None:
    for candidate in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"):
        if candidate.is_file():
            return {line.strip() for line in candidate.read_text().splitlines() if line.strip()}
    return None


def _voc(root: Path, classes: Sequence[str], split: str | None) -> list[Item]:
    names = _split_names(root, split) if split else None
    if split and names is None:
        raise DataLayoutError(f"{root}: no {split}.txt listing the official '{split}' split")
    items = []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        if names is not None and xml.stem not in names:
            continue
        try:
            tree = ElementTree.parse(xml).getroot()
        except (ElementTree.ParseError, OSError) as e:
            raise DataError(f"{xml}: unreadable annotation ({e})") from e
        filename = tree.findtext("filename") or f"{xml.stem}.jpg"
        image = root / "JPEGImages" / filename
        if not image.is_file():
            matches = sorted((root / "JPEGImages").glob(f"{xml.stem}.*"))
            if not matches:
                raise DataError(f"{xml}: its image {filename} is not in JPEGImages/")
            image = matches[0]
        boxes, labels = [], []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            if box is None:
                continue
            try:
                x1, y1, x2, y2 = (float(box.findtext(k) or "nan")
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as e:
                raise DataError(f"{xml}: a box has a non-numeric corner ({e})") from e
            if not (x2 >= x1 and y2 >= y1):
                continue  # degenerate boxes occur in BCCD; they mark nothing
            boxes.append([x1 - 1, y1 - 1, x2, y2])  # 1-based inclusive -> 0-based edges
            labels.append(_class_index(classes, obj.findtext("name") or "", str(xml)))
        items.append(_item(image, boxes, labels))
    return items


def _coco(root: Path, classes: Sequence[str], split: str | None) -> list[Item]:
    candidates = [root / f"{split}.json"] if split else []
    candidates += [root / "annotations.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DataLayoutError(f"{root}: no COCO JSON ({', '.join(c.name for c in candidates)})")
    try:
        coco = json.loads(found.read_text())
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        images = {i["id"]: i["file_name"] for i in coco["images"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{found}: not a COCO annotation file ({e})") from e
    boxes: dict[int, list[list[float]]] = defaultdict(list)
    labels: dict[int, list[int]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
        labels[ann["image_id"]].append(
            _class_index(classes, categories[ann["category_id"]], str(found)))
    items = []
    for image_id, name in sorted(images.items(), key=lambda kv: kv[1]):
        path = root / name if (root / name).is_file() else root / "images" / name
        items.append(_item(path, boxes[image_id], labels[image_id]))
    return items


def _csv(root: Path, classes: Sequence[str], split: str | None) -> list[Item]:
    table = root / "boxes.csv"
    if not table.is_file():
        raise DataLayoutError(f"{root}: no boxes.csv (file,class,x1,y1,x2,y2)")
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    labels: dict[str, list[int]] = defaultdict(list)
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if split and row.get("split") and row["split"] != split:
                continue
            name = row["file"]
            boxes.setdefault(name, [])
            if row.get("class"):
                boxes[name].append([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
                labels[name].append(_class_index(classes, row["class"], str(table)))
    return [_item(root / name, boxes[name], labels[name]) for name in sorted(boxes)]


def detection_items(pipeline: Pipeline, data: str | os.PathLike[str], *,
                    split: str | None = None) -> list[Item]:
    """Every image with its boxes under ``data`` for the pipeline's ``data.layout``.

    Args:
        split: an official split (``train``, ``val``, ``test``) where the layout has them;
            ``None``: every image.

    Raises:
        DataError: missing files, unknown class names, unreadable annotations.
    """
    root = Path(data)
    readers = {"voc": _voc, "coco": _coco, "csv": _csv}
    layout = pipeline.data.layout
    if layout not in readers:
        raise DataLayoutError(f"layout '{layout}' has no boxes (use voc, coco or csv)")
    items = readers[layout](root, pipeline.classes, split)
    if not items:
        raise DataLayoutError(f"{root}: no images found for layout '{layout}'"
                        + (f", split '{split}'" if split else ""))
    return items
