"""A trained pipeline ready to predict: network, weights, calibration and transforms."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import ModelError
from medvision.io import Volume
from medvision.models.bundle import ModelBundle
from medvision.models.ood import FeatureGuard, capture_features
from medvision.models.registry import patch_forward
from medvision.transforms import build_transforms
from medvision.transforms.chain import preprocess_transforms, volume_to_tensor

__all__ = ["LazyPredictor", "Prediction", "Prepared", "Predictor", "prepare_volume"]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A volume after preprocessing: the model-space batch and how to map back."""

    volume: Volume
    image: Any
    data: Mapping[str, Any]
    transform: Any


class Probabilities(tuple[float, ...]):
    """Class probabilities in class order that can also be read by class name, as
    report.json has them: ``p[1]``, ``p["PNEUMONIA"]``, ``dict(p.items())``."""

    classes: tuple[str, ...]

    def __new__(cls, classes: Sequence[str], values: Sequence[float]) -> Probabilities:
        if len(classes) != len(values):
            raise ValueError(f"{len(values)} probabilities for {len(classes)} classes")
        made = super().__new__(cls, (float(v) for v in values))
        made.classes = tuple(classes)
        return made

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            if key not in self.classes:
                raise KeyError(f"{key!r} is not a class ({', '.join(self.classes)})")
            return tuple.__getitem__(self, self.classes.index(key))
        return tuple.__getitem__(self, key)

    def items(self) -> list[tuple[str, float]]:
        return list(zip(self.classes, self, strict=True))

    def as_dict(self) -> dict[str, float]:
        return dict(self.items())

    def __getnewargs__(self) -> tuple[tuple[str, ...], tuple[float, ...]]:  # pickling
        return self.classes, tuple(self)


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the model says about one input.

    Attributes:
        task: ``classification`` or ``segmentation``.
        classes: class names.
        label: predicted class (classification) or the foreground classes found.
        probabilities: calibrated class probabilities (classification), in class order and
            by class name (:class:`Probabilities`: ``p["PNEUMONIA"]``).
        threshold: decision threshold on the last class (binary classification).
        mask: label map in the input's geometry (segmentation).
        volumes_ml: volume of each foreground class in millilitres (segmentation).
        boxes: ``(N, 4)`` detected boxes ``[x1, y1, x2, y2]`` in the input's pixels, at pixel
            edges, scoring at least ``inference.threshold`` (detection).
        box_labels: class index of each box; box_scores: its score (detection).
        counts: detected objects per class (detection).
        ood_distance: Mahalanobis distance of the input's features, when a guard exists.
        ood_threshold: the guard's threshold.
        activations: each network's output of one layer for this input, taken from the
            prediction's own forward pass (``predict_batch(capture=LAYER)``), so GradCAM
            needs no forward pass of its own; in memory only.
    """

    task: str
    classes: tuple[str, ...]
    label: str
    probabilities: tuple[float, ...] | None = None
    threshold: float | None = None
    mask: Volume | None = None
    volumes_ml: Mapping[str, float] = field(default_factory=dict)
    ood_distance: float | None = None
    ood_threshold: float | None = None
    model_output: Any = None
    boxes: Any = None
    box_labels: Any = None
    box_scores: Any = None
    counts: Mapping[str, int] = field(default_factory=dict)
    activations: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.probabilities is not None and not isinstance(self.probabilities,
                                                             Probabilities):
            object.__setattr__(self, "probabilities",
                               Probabilities(self.classes, self.probabilities))

    @property
    def target_index(self) -> int:
        """The class an explanation should target (the predicted class)."""
        return self.classes.index(self.label) if self.label in self.classes else 1


def prepare_volume(pipeline: Pipeline, volume: Volume) -> Prepared:
    """Preprocess one volume as at inference (no augmentation), keeping the inverse; needs
    the pipeline only, so reader processes prepare studies without loading a network.

    Raises:
        ModelError: a 3D volume for a 2D pipeline.
    """
    from monai import transforms as mt

    if pipeline.spatial_dims == 2 and volume.spatial_dims == 3:
        if volume.spatial_shape[2] != 1:
            raise ModelError(f"{volume.source}: 3D input for a 2D pipeline")
        volume = Volume(
            array=volume.array[..., 0], affine=volume.affine, modality=volume.modality,
            source_uids=volume.source_uids, header=volume.header, warnings=volume.warnings,
            source=volume.source)
    transform = mt.Compose(preprocess_transforms(pipeline, train=False, with_label=False))
    out = transform({"image": volume_to_tensor(volume, channels=pipeline.in_channels)})
    return Prepared(volume=volume, image=out["image"].unsqueeze(0), data=out,
                    transform=transform)


class Ensemble:
    """Members' calibrated probabilities averaged: ``log(mean_k softmax(z_k / T_k))``.

    Returned as log-probabilities so the rest of inference treats it as logits: a softmax of
    it gives back the mean probabilities, and an argmax picks the class they favour. It keeps
    gradients, so explanations can score through the whole ensemble.
    """

    def __init__(self, members: Sequence[Any], temperatures: Sequence[float]) -> None:
        self.members = list(members)
        self.temperatures = list(temperatures)

    def __call__(self, image: Any) -> Any:
        import torch

        total = None
        for member, temperature in zip(self.members, self.temperatures, strict=True):
            out = member(image)
            out = out.as_tensor() if hasattr(out, "as_tensor") else out
            probs = torch.softmax(out / temperature, dim=1)
            total = probs if total is None else total + probs
        assert total is not None
        return torch.log((total / len(self.members)).clamp_min(1e-12))


@dataclass(frozen=True, eq=False)
class Predictor:
    """A model bundle with its network built (in eval mode), ready to predict."""

    bundle: ModelBundle
    model: Any
    backend: Any = None
    kind: str = "torch"
    device: Any = None
    precision: str = "float32"
    """Where the PyTorch networks run (``torch.device``; None: the CPU)."""

    def load(self) -> Predictor:
        """This predictor (as :meth:`LazyPredictor.load` gives one)."""
        return self

    @property
    def device_info(self) -> Any:
        """The device as reports name it (:class:`medvision.devices.DeviceInfo`)."""
        from medvision.devices import describe

        return describe(self.device or "cpu")

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline the network was trained with."""
        return self.bundle.pipeline

    @property
    def weights(self) -> Path:
        """The weights file."""
        return self.bundle.weights

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights file."""
        return self.bundle.weights_sha256

    @property
    def temperature(self) -> float:
        """Calibration temperature (1.0: uncalibrated)."""
        return self.bundle.temperature

    @property
    def guard(self) -> FeatureGuard | None:
        """The out-of-distribution guard, when the bundle has one."""
        return self.bundle.guard

    @property
    def folder(self) -> Path | None:
        """The bundle's folder."""
        return self.bundle.folder

    @property
    def backend_name(self) -> str:
        """``torch`` or ``onnx``: what makes the predictions."""
        return self.kind

    @cached_property
    def networks(self) -> tuple[Any, ...]:
        """The PyTorch networks behind the predictions, in eval mode: one for a single model,
        every member for an ensemble (built on first use when the ONNX backend predicts);
        what explanations attribute through."""
        if not self.bundle.members:
            return (self.model,)
        if self.kind == "torch" and isinstance(self.backend, Ensemble):
            return tuple(self.backend.members)
        return (self.model, *(self.bundle.member_network(m) for m in self.bundle.members[1:]))

    @property
    def ensemble_size(self) -> int:
        """Networks whose probabilities are averaged (1: a single model)."""
        return max(1, len(self.bundle.members))

    @classmethod
    def from_pipeline(cls, name_or_path: str | os.PathLike[str], *,
                      weights: str | os.PathLike[str] | None = None,
                      backend: str = "torch",
                      search: Sequence[str | os.PathLike[str]] = (),
                      device: str | None = "cpu", precision: str = "float32") -> Predictor:
        """Load a pipeline's :class:`~medvision.models.ModelBundle` and build its network.

        ``search``: extra folders of pipelines to look in, before installed packages. With
        ``backend="onnx"`` predictions run in onnxruntime from the ``.onnx`` file beside the
        weights (``medvision export``); explanations still use PyTorch. ``device``: where
        the networks run (``auto``, ``cpu``, ``cuda:N``, ``mps``); ``precision``: the
        forward passes' arithmetic (``float32``; ``bfloat16``, or ``float16`` on a GPU, by
        autocast), explanations stay float32.

        Raises:
            ConfigError: invalid pipeline.
            DeviceError: the device is not there.
            CheckpointError: no weights, or weights that do not fit the network.
        """
        bundle = ModelBundle.load(name_or_path, weights=weights, search=tuple(search))
        return cls.from_bundle(bundle, backend=backend, device=device, precision=precision)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, *, backend: str = "torch",
                    device: str | None = "cpu", precision: str = "float32") -> Predictor:
        """A predictor for an already loaded bundle (an ensemble: every member), its
        networks on ``device``."""
        from medvision.devices import check_precision, prepare, resolve_device
        from medvision.errors import DeviceError

        target = resolve_device(device)
        if target.type != "cpu" and backend == "onnx":
            raise DeviceError("the onnx backend runs on the CPU here; use --backend torch "
                              f"for {target}")
        if precision != "float32" and backend == "onnx":
            raise DeviceError(f"the onnx backend runs in float32; use --backend torch for "
                              f"{precision}")
        check_precision(target, precision)
        prepare(target)
        made = cls._build(bundle, backend=backend)
        made.model.to(target)
        if isinstance(made.backend, Ensemble):
            for member in made.backend.members:
                if hasattr(member, "to"):
                    member.to(target)
        return cls(bundle=made.bundle, model=made.model, backend=made.backend, kind=made.kind,
                   device=target, precision=precision)

    @classmethod
    def _build(cls, bundle: ModelBundle, *, backend: str) -> Predictor:
        runner = None
        model = bundle.build_network()
        if bundle.members:
            if bundle.pipeline.task == "detection":
                raise ModelError("detection ensembles are not supported")
            if backend not in ("torch", "onnx"):
                raise ModelError(f"unknown backend '{backend}' (torch or onnx)")
            runners: list[Any] = []
            for n, member in enumerate(bundle.members):
                if backend == "onnx":
                    from medvision.infer.onnx_backend import OnnxModel

                    runners.append(OnnxModel(member.weights.with_suffix(".onnx"),
                                             threads=bundle.pipeline.training.threads))
                else:
                    runners.append(model if n == 0 else bundle.member_network(member))
            ensemble = Ensemble(runners, [m.temperature for m in bundle.members])
            return cls(bundle=bundle, model=model, backend=ensemble, kind=backend)
        if backend == "onnx" and bundle.pipeline.task == "detection":
            from medvision.infer.onnx_backend import OnnxDetectionHead
            from medvision.models.detection import build_detector

            # a second detector (same anchors and post-processing) whose network runs in
            # onnxruntime; the PyTorch one stays whole for explanations
            runner = build_detector(bundle.pipeline)
            runner.network = OnnxDetectionHead(
                bundle.weights.with_suffix(".onnx"), threads=bundle.pipeline.training.threads,
                torch_network=model.network)
            runner.eval()
            return cls(bundle=bundle, model=model, backend=runner, kind="onnx")
        if backend == "onnx":
            from medvision.infer.onnx_backend import OnnxModel

            runner = OnnxModel(bundle.weights.with_suffix(".onnx"),
                               threads=bundle.pipeline.training.threads)
        elif backend != "torch":
            raise ModelError(f"unknown backend '{backend}' (torch or onnx)")
        return cls(bundle=bundle, model=model, backend=runner, kind=backend)

    def logits(self, image: Any) -> Any:
        """Network output for a preprocessed batch: sliding window for volumes larger than
        the training patch, averaged over flip test-time augmentation when configured."""
        import torch

        network = self.model if self.backend is None else self.backend
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        if self.kind == "torch":
            image = image.to(self.device or "cpu", non_blocking=True)

        def forward(x: Any) -> Any:
            return patch_forward(self.pipeline, network, x)

        from medvision.devices import autocast

        with torch.no_grad(), autocast(self.device or "cpu", self.precision):
            out = forward(image)
            flips = self.pipeline.inference.tta_flips
            for axis in flips:
                flipped = forward(torch.flip(image, dims=(axis + 2,)))
                if self.pipeline.task == "segmentation":
                    flipped = torch.flip(flipped, dims=(axis + 2,))
                out = out + flipped
        out = out / (1 + len(flips))
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return out.float().cpu()

    def prepare(self, volume: Volume) -> Prepared:
        """Preprocess one volume as at inference (no augmentation), keeping the inverse."""
        return prepare_volume(self.pipeline, volume)

    def to_input_space(self, prepared: Prepared, array: Any, *, nearest: bool) -> Volume:
        """Map a model-space map ``(C, ...)`` back onto the input's grid, as a Volume."""
        import torch
        from monai import transforms as mt
        from monai.data import MetaTensor

        reference = prepared.data["image"]
        tensor = MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32),
                            affine=reference.affine)
        tensor.applied_operations = list(reference.applied_operations)
        inverse = mt.Invertd(keys="map", transform=prepared.transform, orig_keys="image",
                             nearest_interp=nearest)
        mapped = inverse({"map": tensor, "image": reference})["map"]
        values = mapped.detach().cpu().numpy().astype(np.float32)
        source = prepared.volume
        if values.shape[1:] != source.spatial_shape:
            raise ModelError(f"{source.source}: map came back as {values.shape[1:]}, "
                             f"expected the input's {source.spatial_shape}")
        return Volume(array=values, affine=source.affine, modality=source.modality,
                      header={"derived_from": source.header.get("SeriesKey", source.source)},
                      source=source.source)

    def predict(self, prepared: Prepared) -> Prediction:
        """Classify, segment or detect in a prepared volume."""
        return self.predict_batch([prepared])[0]

    def predict_batch(self, prepared: Sequence[Prepared], *,
                      capture: str | None = None) -> list[Prediction]:
        """:meth:`predict` for several volumes: classification inputs (all of one size
        after preprocessing) go through the network, and the OOD guard's features, in one
        forward pass; segmentation and detection run one by one. Equal to predicting each
        alone (the networks are in eval mode). ``capture``: a layer whose output each
        network's first (unflipped) pass keeps in :attr:`Prediction.activations`."""
        if self.pipeline.task == "detection":
            return [self._detect(p) for p in prepared]
        if self.pipeline.task != "classification" or len(
                {tuple(p.image.shape) for p in prepared}) != 1:
            return [self._predict_one(p) for p in prepared]
        import torch

        images = torch.cat([p.image.as_tensor() if hasattr(p.image, "as_tensor") else p.image
                            for p in prepared])
        from contextlib import ExitStack

        with ExitStack() as stack:
            captured = ([stack.enter_context(capture_features(network, capture, pooled=False))
                         for network in self.networks]
                        if capture and self.kind == "torch" else [])
            logits, distances = self._guarded_logits(images)
        activations: list[Any] = [c.features for c in captured]
        kept = bool(activations) and all(a is not None for a in activations)
        return [replace(self._classified(logits[k:k + 1], distances[k]),
                        activations=tuple(a[k:k + 1] for a in activations) if kept else None)
                for k in range(len(prepared))]

    def _guarded_logits(self, images: Any) -> tuple[Any, list[float | None]]:
        """:meth:`logits` and each image's OOD distance. Where the guard's network makes the
        prediction (PyTorch, not through a sliding window) its features are taken from
        that same forward pass; else they need one of their own."""
        if self.guard is None:
            return self.logits(images), [None] * len(images)
        if self.kind == "torch" and self.pipeline.task == "classification":
            with capture_features(self.model, self.guard.layer) as found:
                logits = self.logits(images)
            features = found.features
        else:
            logits = self.logits(images)
            features = None
        if features is None:
            features = FeatureGuard.features(self.model, self.guard.layer, [images])
        return logits, [float(d) for d in self.guard.distance(features)]

    def _classified(self, logits: Any, distance: float | None) -> Prediction:
        import torch

        classes = self.pipeline.classes
        probs = torch.softmax(logits / self.temperature, dim=1)[0].numpy()
        if len(classes) == 2:
            index = int(probs[1] >= self.pipeline.inference.threshold)
            threshold = self.pipeline.inference.threshold
        else:
            index, threshold = int(probs.argmax()), None
        return Prediction(label=classes[index], probabilities=tuple(float(p) for p in probs),
                          threshold=threshold, task=self.pipeline.task, classes=classes,
                          ood_distance=distance,
                          ood_threshold=self.guard.threshold if self.guard else None,
                          model_output=logits)

    def _predict_one(self, prepared: Prepared) -> Prediction:
        classes = self.pipeline.classes
        found, distances = self._guarded_logits(prepared.image)
        logits, distance = found, distances[0]
        if self.pipeline.task == "classification":
            return self._classified(logits, distance)
        common = {"task": self.pipeline.task, "classes": classes, "ood_distance": distance,
                  "ood_threshold": self.guard.threshold if self.guard else None,
                  "model_output": logits}
        labels = logits.argmax(dim=1)[0].numpy().astype(np.float32)
        mask = self.to_input_space(prepared, labels[np.newaxis], nearest=True)
        voxel_ml = float(np.prod(mask.spacing)) / 1000.0
        counts = {name: int((np.asarray(mask.array[0]) == k).sum())
                  for k, name in enumerate(classes) if k > 0}
        found = [name for name, count in counts.items() if count > 0]
        return Prediction(label="+".join(found) if found else classes[0], mask=mask,
                          volumes_ml={n: c * voxel_ml for n, c in counts.items()}, **common)

    def _detect(self, prepared: Prepared) -> Prediction:
        """Boxes scoring at least ``inference.threshold``, in the input's pixels."""
        from medvision.models.detection import detect

        classes = self.pipeline.classes
        detector = self.backend if self.backend is not None else self.model
        found = detect(detector, prepared.image[0], prepared.data["zoom"])
        keep = found["scores"] >= self.pipeline.inference.threshold
        boxes, labels, scores = (found[k][keep] for k in ("boxes", "labels", "scores"))
        counts = {name: int((labels == k).sum()) for k, name in enumerate(classes)}
        present = [name for name, n in counts.items() if n]
        zoom = np.asarray(prepared.data["zoom"], dtype=np.float32)
        return Prediction(task=str(self.pipeline.task), classes=classes,
                          label="+".join(present) if present else "none", boxes=boxes,
                          box_labels=labels, box_scores=scores, counts=counts,
                          model_output={"scale": np.concatenate([zoom, zoom])})

    def run_items(self, items: Sequence[dict[str, Any]], *,
                  batch_size: int | None = None) -> Iterator[tuple[dict[str, Any], Any, Any]]:
        """Yield ``(batch, logits, labels)`` over labelled items, preprocessed for inference.

        The batch's image is a MetaTensor (its ``affine`` is the model-space geometry).
        """
        from monai.data import DataLoader, Dataset

        data = [{k: v for k, v in item.items() if k != "group"} for item in items]
        dataset = Dataset(data, transform=build_transforms(self.pipeline, train=False,
                                                           keep_meta=True))
        loader = DataLoader(dataset, batch_size=batch_size or self.pipeline.training.batch_size,
                            shuffle=False, num_workers=0)
        for batch in loader:
            yield batch, self.logits(batch["image"]), batch["label"]


@dataclass(frozen=True, eq=False)
class LazyPredictor:
    """A pipeline's bundle whose networks are built only when first needed: a batch in
    which every study is up to date decides that from the bundle alone (pipeline, weights
    digest, backend) and never builds a network."""

    bundle: ModelBundle
    backend: str = "torch"
    device: str | None = "cpu"
    precision: str = "float32"

    @classmethod
    def from_pipeline(cls, name_or_path: str | os.PathLike[str], *,
                      weights: str | os.PathLike[str] | None = None, backend: str = "torch",
                      search: Sequence[str | os.PathLike[str]] = (),
                      device: str | None = "cpu", precision: str = "float32") -> LazyPredictor:
        """Read the bundle (pipeline, weights digest, calibration, guard); build nothing."""
        from medvision.devices import check_precision, resolve_device

        # a device or precision that cannot run is an error now, not later
        check_precision(resolve_device(device), precision)
        return cls(bundle=ModelBundle.load(name_or_path, weights=weights,
                                           search=tuple(search)),
                   backend=backend, device=device, precision=precision)

    @property
    def pipeline(self) -> Pipeline:
        return self.bundle.pipeline

    @property
    def weights_sha256(self) -> str:
        return self.bundle.weights_sha256

    @property
    def backend_name(self) -> str:
        return self.backend

    @property
    def folder(self) -> Path | None:
        return self.bundle.folder

    @property
    def weights(self) -> Path:
        return self.bundle.weights

    @property
    def ensemble_size(self) -> int:
        return max(1, len(self.bundle.members))

    @cached_property
    def loaded(self) -> Predictor:
        return Predictor.from_bundle(self.bundle, backend=self.backend, device=self.device,
                                     precision=self.precision)

    def load(self) -> Predictor:
        """The predictor, its networks built on the first call."""
        return self.loaded
