"""Preprocessing and augmentation chains, from config, out of MONAI's dictionary transforms;
the one place that chooses them by task (classification, segmentation, detection).

Training, evaluation and analysis share the deterministic part (load, orientation, spacing,
intensity, size) so a model always sees images prepared the same way; augmentation is
appended only for training. The deterministic part comes first, so MONAI's CacheDataset
caches exactly it. Detection moves its boxes with the image (MONAI's box transforms) and keeps
the zoom it applied, to map predicted boxes back to the input's pixels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from medvision.config import Pipeline
from medvision.io import Volume, read_volume

__all__ = ["LoadVolumed", "ResizeWithBoxesd", "build_transforms", "detection_transforms",
           "preprocess_transforms", "volume_to_tensor"]


def volume_to_tensor(volume: Volume, *, channels: int) -> Any:
    """A MONAI MetaTensor of ``volume`` with its affine, adapted to ``channels`` channels.

    Colour given to a grey model is averaged; grey given to a colour model is repeated.
    """
    from monai.data import MetaTensor

    array = np.asarray(volume.array)
    if array.shape[0] != channels:
        if channels == 1:
            array = array.mean(axis=0, keepdims=True)
        elif array.shape[0] == 1:
            array = np.repeat(array, channels, axis=0)
        else:
            from medvision.errors import DataError

            raise DataError(f"{volume.source}: {array.shape[0]} channels, model expects {channels}")
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # torch wants writable, contiguous memory
    import torch

    return MetaTensor(array, affine=torch.as_tensor(np.array(volume.affine)),
                      meta={"filename_or_obj": volume.source})


class LoadVolumed(MapTransform):
    """Dictionary transform: replace paths (or arrays) under ``keys`` by MetaTensors.

    Reading goes through :func:`medvision.io.read_volume`, so training sees DICOM, NIfTI and
    PNG/JPEG exactly as analysis will. Arrays (MedMNIST ``.npz`` items) are wrapped as they are
    with an identity affine.

    It is a MONAI ``MapTransform`` (deterministic): MONAI's ``CacheDataset`` and
    ``PersistentDataset`` cache the chain up to the first random or non-MONAI transform, so a
    plain class here made them cache nothing and every epoch re-read and re-scaled every image.
    """

    def __init__(self, keys: Sequence[Hashable], *, channels: Sequence[int]) -> None:
        super().__init__(keys)
        self.keys = tuple(keys)
        self.channels = tuple(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key, channels in zip(self.keys, self.channels, strict=True):
            value = out[key]
            if isinstance(value, np.ndarray):
                array = value.astype(np.float32)
                if array.ndim == 3 or array.ndim == 2:
                    array = array[np.newaxis]
                value = Volume(array=array, affine=np.eye(4))
            else:
                value = read_volume(value)
            out[key] = volume_to_tensor(value, channels=channels)
        return out


def _intensity(pipeline: Pipeline) -> Any:
    from monai import transforms as mt

    cfg = pipeline.preprocess.intensity
    if cfg.kind == "scale_range" or cfg.kind == "window":
        return mt.ScaleIntensityRanged("image", a_min=cfg.a_min, a_max=cfg.a_max, b_min=0.0,
                                       b_max=1.0, clip=cfg.kind == "window")
    if cfg.kind == "zscore":
        return mt.NormalizeIntensityd("image", nonzero=cfg.nonzero)
    return mt.ScaleIntensityRangePercentilesd("image", lower=cfg.lower, upper=cfg.upper,
                                              b_min=0.0, b_max=1.0, clip=True)


def preprocess_transforms(pipeline: Pipeline, *, train: bool = True,
                          with_label: bool | None = None) -> list[Any]:
    """The deterministic transforms (after loading), as a list.

    For segmentation, training crops or pads to ``preprocess.size``; inference only pads (to
    at least that size), so nothing is cut away and larger inputs go through a sliding
    window. ``with_label`` (default: for segmentation) also moves a ``label`` map along.
    """
    from monai import transforms as mt

    if pipeline.task == "detection":
        return _detection_preprocess(pipeline, with_boxes=bool(with_label))
    seg = pipeline.task == "segmentation"
    labelled = seg if with_label is None else with_label
    keys = ["image", "label"] if labelled else ["image"]
    nearest = ["bilinear", "nearest"] if labelled else ["bilinear"]
    pre = pipeline.preprocess
    chain: list[Any] = []
    if pre.orientation:
        chain.append(mt.Orientationd(keys, axcodes=pre.orientation[: pipeline.spatial_dims],
                                     labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pre.spacing:
        chain.append(mt.Spacingd(keys, pixdim=pre.spacing, mode=nearest))
    chain.append(_intensity(pipeline))
    if pre.crop_foreground:
        chain.append(mt.CropForegroundd(keys, source_key="image", allow_smaller=True))
    if pre.size:
        if seg and train:
            chain.append(mt.ResizeWithPadOrCropd(keys, spatial_size=pre.size))
        elif seg:
            chain.append(mt.SpatialPadd(keys, spatial_size=pre.size))
        else:
            chain.append(mt.Resized(keys, spatial_size=pre.size, mode="area"))
    return chain


def augment_transforms(pipeline: Pipeline) -> list[Any]:
    """The random transforms (training only), as a list."""
    from monai import transforms as mt

    seg = pipeline.task == "segmentation"
    keys = ["image", "label"] if seg else ["image"]
    modes = ["bilinear", "nearest"] if seg else ["bilinear"]
    aug = pipeline.augment
    dims = pipeline.spatial_dims
    chain: list[Any] = []
    if aug.rotate_degrees or aug.scale or aug.translate_fraction:
        angle = np.deg2rad(aug.rotate_degrees)
        size = pipeline.preprocess.size or (0,) * dims
        chain.append(mt.RandAffined(
            keys, prob=aug.prob, mode=modes, padding_mode="zeros",
            rotate_range=(angle,) if dims == 2 else (angle,) * 3,
            scale_range=(aug.scale,) * dims,
            translate_range=tuple(aug.translate_fraction * s for s in size),
        ))
    if aug.elastic:
        if dims == 2:
            chain.append(mt.Rand2DElasticd(keys, spacing=(20, 20), magnitude_range=(1, 2),
                                           prob=aug.prob / 2, mode=modes))
        else:
            chain.append(mt.Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(50, 100),
                                           prob=aug.prob / 2, mode=modes))
    for axis in aug.flip_axes:
        chain.append(mt.RandFlipd(keys, prob=0.5, spatial_axis=axis))
    if aug.gamma:
        chain.append(mt.RandAdjustContrastd("image", prob=aug.prob, gamma=aug.gamma))
    if aug.intensity_shift:
        chain.append(mt.RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.prob))
    if aug.blur_sigma:
        low, high = aug.blur_sigma
        chain.append(mt.RandGaussianSmoothd("image", sigma_x=(low, high), sigma_y=(low, high),
                                            sigma_z=(low, high), prob=aug.prob / 2))
    if aug.noise_std:
        chain.append(mt.RandGaussianNoised("image", prob=aug.prob, std=aug.noise_std))
    return chain


def build_transforms(pipeline: Pipeline, *, train: bool, keep_meta: bool = False) -> Any:
    """The whole chain: load, preprocess, and (for training) augment; a MONAI ``Compose``.

    Args:
        pipeline: the pipeline.
        train: append the augmentation.
        keep_meta: keep MONAI MetaTensors (affine, applied operations) in the output, for
            callers that need the geometry or to invert the chain.
    """
    from monai import transforms as mt

    if pipeline.task == "detection":
        return detection_transforms(pipeline, train=train, with_boxes=train)
    seg = pipeline.task == "segmentation"
    load = LoadVolumed(["image", "label"] if seg else ["image"],
                       channels=[pipeline.in_channels, 1] if seg else [pipeline.in_channels])
    chain = [load, *preprocess_transforms(pipeline, train=train)]
    if train:
        chain += augment_transforms(pipeline)
    chain.append(mt.EnsureTyped(["image", "label"] if seg else ["image"], track_meta=keep_meta))
    return mt.Compose(chain)


BOX_KEYS: dict[str, Any] = {"image_keys": "image", "box_keys": "boxes", "box_ref_image_keys": "image"}


def _invertible() -> type:
    from monai.transforms import InvertibleTransform

    return InvertibleTransform


class ResizeWithBoxesd(_invertible()):  # type: ignore[misc]
    """Resize the image to ``preprocess.size`` and its boxes with it (MONAI's ``ZoomBoxd``
    with this image's zoom factors); the factors are kept under ``zoom`` to map predictions
    back to the original pixels. Invertible: a model-space map (saliency) goes back to the
    input's pixels, interpolated linearly (``Invertd``)."""

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

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Each tensor whose last recorded operation is this resize, back to its size
        before it (linear interpolation; the operation is taken off its record)."""
        import torch
        from monai.data import MetaTensor

        out = dict(data)
        for key, value in out.items():
            record = getattr(value, "applied_operations", None)
            if not record or record[-1].get("class") not in ("Zoom", "ZoomBox"):
                continue
            operations = list(record)
            size = tuple(int(s) for s in operations.pop()["orig_size"])
            plain = value.as_tensor() if isinstance(value, MetaTensor) else value
            mode = "bilinear" if len(size) == 2 else "trilinear"
            resized = torch.nn.functional.interpolate(plain[None].float(), size=size,
                                                      mode=mode, align_corners=False)[0]
            restored = MetaTensor(resized, affine=value.affine)
            restored.applied_operations = operations
            out[key] = restored
        return out


def _detection_preprocess(pipeline: Pipeline, *, with_boxes: bool) -> list[Any]:
    """Detection's deterministic part: the pipeline's intensity scaling, then a resize to
    ``preprocess.size`` moving the boxes (when given) with the image."""
    from monai import transforms as mt
    from monai.apps.detection.transforms import dictionary as bt

    steps: list[Any] = [_intensity(pipeline)]
    if with_boxes:
        steps.append(mt.EnsureTyped(["boxes"], dtype=np.float32, track_meta=False))
        steps.append(mt.EnsureTyped(["labels"], dtype=np.int64, track_meta=False))
    steps.append(ResizeWithBoxesd(pipeline.preprocess.size))
    if with_boxes:
        steps.append(bt.ClipBoxToImaged(box_keys="boxes", label_keys="labels",
                                        box_ref_image_keys="image", remove_empty=True))
    return steps


def detection_transforms(pipeline: Pipeline, *, train: bool, with_boxes: bool = True) -> Any:
    """Load, scale the intensity (``preprocess.intensity``), resize with the boxes; in
    training also random flips, 90-degree rotations, zoom and intensity changes, each moving
    the boxes with the image."""
    from monai import transforms as mt
    from monai.apps.detection.transforms import dictionary as bt

    steps: list[Any] = [LoadVolumed(["image"], channels=[pipeline.in_channels]),
                        *_detection_preprocess(pipeline, with_boxes=with_boxes)]
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
