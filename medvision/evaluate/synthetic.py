"""How good, and how private, are synthetic images (``medvision synthesize metrics``).

Three spaces, each independent of the generator:

* ``classifier``: pooled features (``qc.feature_layer``) of a trained classifier given with
  ``features`` (for example the shipped pipeline of the same images), on its own
  preprocessing;
* ``random``: pooled features of a MONAI ResNet-18 with seeded random weights, trained on
  nothing (random embeddings are informative for distribution metrics, Naeem et al. 2020;
  with no network here, an ImageNet Inception cannot be downloaded);
* ``pixels``: the images at the generator's size, in [-1, 1] (memorisation only).

Per class: the Fréchet distance (MONAI ``FIDMetric``) between synthetic images and held-out
real images (the validation split, never seen by the generator), next to the same distance
between the real training and held-out images (the floor a perfect generator would reach at
these sample sizes), precision/recall of the generated distribution (Kynkäänniemi et al.
2019: k-nearest-neighbour balls, k = 3), and with a classifier the share of synthetic images
it gives their intended class, next to the same share for held-out real images.

Memorisation: for every synthetic image the nearest training image (pixel and classifier or
random feature space) and the ratio of that distance to the median training-to-training
nearest-neighbour distance. The fraction with a ratio under 1 is "closer than typical";
under ``copy_ratio`` (0.1 by default) it is flagged as a likely copy. The page shows the
closest pairs side by side.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvision.atomic import write_text_atomic
from medvision.config import Pipeline
from medvision.errors import ConfigError, DataError

__all__ = ["MemorisationPair", "SyntheticQuality", "frechet_distance", "nearest",
           "precision_recall", "synthetic_items", "synthetic_quality", "write_quality"]

log = logging.getLogger(__name__)

Item = dict[str, Any]
_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii.gz", ".nii")


def synthetic_items(pipeline: Pipeline, folder: str | os.PathLike[str]) -> list[Item]:
    """The images of a class-folder tree of synthetic images (``OUT/<class>/...``), labelled
    by folder; sidecars are skipped. Every image counts, with or without provenance.

    Raises:
        DataError: a folder that is not a class of the pipeline, or no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of synthetic images")
    items: list[Item] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in pipeline.classes:
            raise DataError(f"{sub}: '{sub.name}' is not a class of {pipeline.name} "
                            f"({', '.join(pipeline.classes)})")
        label = pipeline.classes.index(sub.name)
        for path in sorted(sub.iterdir()):
            if path.is_file() and path.name.lower().endswith(_SUFFIXES):
                items.append({"image": str(path), "label": label,
                              "group": f"synthetic/{sub.name}/{path.name}"})
    if not items:
        raise DataError(f"{root}: no synthetic images (expected {root}/<class>/*.png|.nii.gz)")
    return items


def _load(transform: Any, items: Sequence[Item]) -> np.ndarray:
    """The transformed images of ``items``, stacked ``(N, C, ...)`` float32."""
    out = []
    for item in items:
        data = transform({"image": item["image"]})
        image = data["image"]
        out.append(np.asarray(image.as_tensor() if hasattr(image, "as_tensor") else image,
                              dtype=np.float32))
    return np.stack(out) if out else np.zeros((0,), np.float32)


def _features(model: Any, layer: str, arrays: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    from medvision.models.ood import pooled_features

    batches = (torch.from_numpy(arrays[i:i + batch]) for i in range(0, len(arrays), batch))
    return pooled_features(model, layer, batches)[0]


def _features_and_classes(model: Any, layer: str, arrays: np.ndarray, batch: int = 32
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled ``layer`` features ``(N, F)`` and the network's class (argmax) of each image."""
    import torch

    from medvision.models.ood import pooled_features

    batches = (torch.from_numpy(arrays[i:i + batch]) for i in range(0, len(arrays), batch))
    features, outputs = pooled_features(model, layer, batches, keep_outputs=True)
    return features, outputs.argmax(dim=1).numpy()


def _random_network(pipeline: Pipeline) -> Any:
    import torch
    from monai.networks.nets import resnet18

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        network = resnet18(spatial_dims=pipeline.spatial_dims,
                           n_input_channels=pipeline.in_channels, num_classes=2)
    finally:
        torch.random.set_rng_state(state)
    return network.eval()


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, F)`` (MONAI
    ``FIDMetric``)."""
    import torch
    from monai.metrics import FIDMetric

    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    with warnings.catch_warnings():  # singular covariances of small samples: sqrtm warns
        warnings.simplefilter("ignore")
        value = FIDMetric()(torch.from_numpy(np.asarray(fake, np.float64)),
                            torch.from_numpy(np.asarray(real, np.float64)))
    return float(value)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch

    return torch.cdist(torch.from_numpy(np.asarray(a, np.float64).reshape(len(a), -1)),
                       torch.from_numpy(np.asarray(b, np.float64).reshape(len(b), -1))).numpy()


def nearest(queries: np.ndarray, reference: np.ndarray, *, exclude_self: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the Euclidean distance to its nearest reference and that reference's
    index; ``exclude_self`` when the two sets are the same (a point is not its own
    neighbour)."""
    d = _distances(queries, reference)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    index = d.argmin(axis=1)
    return d[np.arange(len(d)), index], index


def _kth_radius(points: np.ndarray, k: int) -> np.ndarray:
    d = _distances(points, points)
    np.fill_diagonal(d, np.inf)
    k = min(k, len(points) - 1)
    return np.sort(d, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of
    generated samples inside some real sample's k-NN ball, recall the share of real samples
    inside some generated sample's k-NN ball."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan"), float("nan")
    real_radius, fake_radius = _kth_radius(real, k), _kth_radius(fake, k)
    cross = _distances(fake, real)
    precision = float(np.mean((cross <= real_radius[None, :]).any(axis=1)))
    recall = float(np.mean((cross.T <= fake_radius[None, :]).any(axis=1)))
    return precision, recall


@dataclass(frozen=True)
class MemorisationPair:
    """A synthetic image, its nearest training image in one space, and how close."""

    synthetic: str
    training: str
    space: str
    distance: float
    ratio: float
    """The distance over the median training-to-training nearest-neighbour distance."""
    copy: bool


@dataclass(frozen=True)
class SyntheticQuality:
    """What ``synthetic_quality`` measured (written as ``quality.json``)."""

    pipeline: str
    n_synthetic: dict[str, int]
    n_reference: dict[str, int]
    n_training: int
    distribution: dict[str, dict[str, dict[str, float]]]
    """Per class, per feature space: ``fd``, ``fd_real`` (train vs held-out real), ``precision``,
    ``recall``; in the classifier space also ``agreement`` (the share of synthetic images the
    classifier gives their intended class) and ``agreement_real`` (the same for held-out real
    images of the class)."""
    memorisation: dict[str, dict[str, float]]
    """Per space: ``train_nn_median``, ``closer_than_typical`` (fraction), ``copies``."""
    copy_ratio: float
    copies: tuple[str, ...]
    """Synthetic images flagged as likely copies of a training image (in any space)."""
    pairs: tuple[MemorisationPair, ...] = field(repr=False)
    """Every synthetic image's nearest training image, per space, closest first."""
    skipped: tuple[str, ...] = ()
    """Synthetic files that could not be read (each logged with its reason)."""


def _sample(items: Sequence[Item], limit: int | None, seed: int) -> list[Item]:
    if limit is None or len(items) <= limit:
        return list(items)
    index = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
    return [items[i] for i in index]


def synthetic_quality(pipeline: Pipeline, *, synthetic: Sequence[Item],
                      training: Sequence[Item], reference: Sequence[Item],
                      classifier: Any = None, classifier_pipeline: Pipeline | None = None,
                      copy_ratio: float = 0.1, max_real: int | None = 2000, k: int = 3,
                      seed: int = 0) -> tuple[SyntheticQuality, dict[str, Any]]:
    """Measure synthetic images against the generator's training images and held-out real
    ones.

    Args:
        pipeline: the pipeline the generator models (its preprocessing and generative size).
        synthetic: synthetic items (``image``, ``label``).
        training: the real images the generator was trained on (memorisation reference).
        reference: held-out real images (distribution reference).
        classifier: a trained network whose ``classifier_pipeline.qc.feature_layer`` gives
            the ``classifier`` feature space; without one that space is left out.
        copy_ratio: flag a synthetic image whose nearest-training distance is below this share
            of the typical training-to-training distance.
        max_real: at most this many held-out reference images (a seeded sample); the
            training images are all used.

    Returns:
        The measurements, and the pixel arrays (``synthetic``, ``training``) for the page.

    Raises:
        DataError: no synthetic or no training images.
    """
    from medvision.train.data import readable_items

    synthetic, unreadable = readable_items(synthetic)  # each skipped one is logged
    if not synthetic or not training:
        raise DataError("the quality check needs synthetic and training images")
    if not 0 < copy_ratio < 1:
        raise ConfigError(f"copy ratio {copy_ratio} is not in (0, 1)")
    training = list(training)  # every one: a copy of any training image must be found
    reference = _sample(reference, max_real, seed)
    from medvision.train.synthesize import generator_transform

    pixel_tf = generator_transform(pipeline)
    pixels: dict[str, Any] = {"synthetic": _load(pixel_tf, synthetic), "training": _load(pixel_tf, training),
              "reference": _load(pixel_tf, reference) if reference else None}
    log.info("quality: %d synthetic, %d training, %d held-out images", len(synthetic),
             len(training), len(reference))
    spaces: dict[str, dict[str, np.ndarray]] = {}
    network = _random_network(pipeline)
    spaces["random"] = {name: _features(network, "layer4", array)
                        for name, array in pixels.items() if array is not None}
    if classifier is not None and classifier_pipeline is not None:
        from medvision.transforms import build_transforms

        transform = build_transforms(classifier_pipeline, train=False)
        layer = classifier_pipeline.qc.feature_layer or "layer4"
        spaces["classifier"], predicted = {}, {}
        for name, items in (("synthetic", synthetic), ("training", training),
                            ("reference", reference)):
            if items:
                spaces["classifier"][name], predicted[name] = _features_and_classes(
                    classifier, layer, _load(transform, items))
    labels = {name: np.array([int(i["label"]) for i in items]) for name, items in
              (("synthetic", synthetic), ("training", training), ("reference", reference))}
    distribution: dict[str, dict[str, dict[str, float]]] = {}
    for c in sorted(set(labels["synthetic"].tolist())):
        name = pipeline.classes[c]
        distribution[name] = {}
        for space, feats in spaces.items():
            fake = feats["synthetic"][labels["synthetic"] == c]
            train = feats["training"][labels["training"] == c]
            real = feats["reference"][labels["reference"] == c] if "reference" in feats else (
                np.zeros((0, fake.shape[1])))
            precision, recall = precision_recall(real, fake, k=k)
            distribution[name][space] = {
                "fd": frechet_distance(real, fake), "fd_real": frechet_distance(real, train),
                "precision": precision, "recall": recall}
        if classifier_pipeline is not None and name in classifier_pipeline.classes:
            # the share the classifier gives the intended class, synthetic vs held-out real
            own = classifier_pipeline.classes.index(name)
            real_c = predicted.get("reference", np.zeros(0))[labels["reference"] == c]
            distribution[name]["classifier"].update(
                agreement=float(np.mean(predicted["synthetic"][labels["synthetic"] == c]
                                        == own)),
                agreement_real=float(np.mean(real_c == own)) if len(real_c) else float("nan"))
    memorisation: dict[str, dict[str, float]] = {}
    pairs: list[MemorisationPair] = []
    copies: set[str] = set()
    memo_spaces: dict[str, dict[str, Any]] = {
        "pixels": {"synthetic": pixels["synthetic"], "training": pixels["training"]}}
    memo_spaces["classifier" if "classifier" in spaces else "random"] = (
        spaces["classifier"] if "classifier" in spaces else spaces["random"])
    for space, feats in memo_spaces.items():
        train_nn, _ = nearest(feats["training"], feats["training"], exclude_self=True)
        typical = float(np.median(train_nn))
        distance, index = nearest(feats["synthetic"], feats["training"])
        ratio = distance / typical if typical > 0 else np.where(distance > 0, np.inf, 0.0)
        flagged = ratio < copy_ratio
        for n, item in enumerate(synthetic):
            pair = MemorisationPair(
                synthetic=str(item["image"]), training=_name(training[int(index[n])]),
                space=space, distance=float(distance[n]), ratio=float(ratio[n]),
                copy=bool(flagged[n]))
            pairs.append(pair)
            if pair.copy:
                copies.add(pair.synthetic)
        memorisation[space] = {"train_nn_median": typical,
                               "closer_than_typical": float(np.mean(ratio < 1.0)),
                               "copies": int(flagged.sum()),
                               "nearest_ratio_min": float(ratio.min()),
                               "nearest_ratio_median": float(np.median(ratio))}
    pairs.sort(key=lambda p: (p.ratio, p.space))
    quality = SyntheticQuality(
        pipeline=pipeline.name,
        n_synthetic=_counts(pipeline, labels["synthetic"]),
        n_reference=_counts(pipeline, labels["reference"]), n_training=len(training),
        distribution=distribution, memorisation=memorisation, copy_ratio=copy_ratio,
        copies=tuple(sorted(copies)), pairs=tuple(pairs),
        skipped=tuple(path for path, _ in unreadable))
    pixel_index = {"synthetic": {str(i["image"]): n for n, i in enumerate(synthetic)},
                   "training": {_name(i): n for n, i in enumerate(training)}}
    return quality, {"synthetic": pixels["synthetic"], "training": pixels["training"],
                     "index": pixel_index, "labels": labels,
                     "classes": list(pipeline.classes)}


def _name(item: Item) -> str:
    image = item["image"]
    return image if isinstance(image, str) else str(item.get("group", "array"))


def _counts(pipeline: Pipeline, labels: np.ndarray) -> dict[str, int]:
    return {pipeline.classes[c]: int((labels == c).sum()) for c in sorted(set(labels.tolist()))}


def _grey(array: np.ndarray) -> np.ndarray:
    """One image ``(C, ...)`` in [-1, 1] as uint8 rows (the middle slice of a volume)."""
    image = array[0]
    while image.ndim > 2:
        image = image[..., image.shape[-1] // 2]
    return ((np.clip(image, -1, 1) + 1) * 127.5).round().astype(np.uint8).T


def sample_grid(labels: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray],
                classes: Sequence[str], *, per_row: int = 8, gap: int = 2) -> Any:
    """A contact sheet (PIL image): per class (``labels`` index ``classes``) one row of
    synthetic images and one row of real training images."""
    from PIL import Image

    rows: list[list[np.ndarray]] = []
    for c, _ in enumerate(classes):
        for kind in ("synthetic", "training"):
            chosen = np.flatnonzero(labels[kind] == c)[:per_row]
            if len(chosen):
                rows.append([_grey(arrays[kind][i]) for i in chosen])
    if not rows:
        return Image.new("L", (1, 1))
    h, w = rows[0][0].shape
    sheet = np.full((len(rows) * (h + gap), per_row * (w + gap)), 255, np.uint8)
    for r, row in enumerate(rows):
        for n, tile in enumerate(row):
            sheet[r * (h + gap):r * (h + gap) + h, n * (w + gap):n * (w + gap) + w] = tile
    return Image.fromarray(sheet)


def _thumbnail(array: np.ndarray) -> str:
    """A data-URI PNG of one image ``(C, ...)`` in [-1, 1] (the middle slice of a volume)."""
    from PIL import Image

    pixels = _grey(array)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2),
                                   Image.Resampling.NEAREST).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _short(path: str) -> str:
    """``class/file`` of a path (the page stays readable; quality.json has full paths)."""
    parts = Path(path).parts
    return "/".join(parts[-2:])


def write_quality(quality: SyntheticQuality, arrays: Mapping[str, Any],
                  out_dir: str | os.PathLike[str], *, shown: int = 24) -> tuple[Path, Path]:
    """``quality.json`` (everything, every pair), ``memorisation.html`` (the summary and the
    ``shown`` closest pairs, flagged copies first) and ``samples.png`` (per class a row of
    synthetic and a row of training images; volumes: middle slices) in ``out_dir``."""
    from medvision.report.html import render_synthetic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(quality)
    path_json = write_text_atomic(out / "quality.json", json.dumps(data, indent=1))
    index = arrays["index"]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for pair in quality.pairs:
        if len(rows) >= shown:
            break
        if (pair.synthetic, pair.space) in seen:
            continue
        seen.add((pair.synthetic, pair.space))
        syn = index["synthetic"].get(pair.synthetic)
        real = index["training"].get(pair.training)
        rows.append({"synthetic": _short(pair.synthetic), "training": _short(pair.training),
                     "space": pair.space, "distance": f"{pair.distance:.4g}",
                     "ratio": f"{pair.ratio:.3f}", "flagged": pair.copy,
                     "synthetic_png": _thumbnail(arrays["synthetic"][syn]),
                     "training_png": _thumbnail(arrays["training"][real])})
    sample_grid(arrays["labels"], arrays, arrays["classes"]).save(out / "samples.png")
    page = render_synthetic(data, rows)
    path_html = write_text_atomic(out / "memorisation.html", page)
    return path_json, path_html
