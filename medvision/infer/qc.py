"""Input checks before a study is scored: fit to the pipeline, and distance from training data.

Two layers:

* :func:`check_input`: rules from the pipeline file (modality, body part, dimensionality,
  slice count, voxel size, finite intensities). A failed hard rule rejects the study.
* :class:`FeatureGuard`: an out-of-distribution guard. Features pooled from one layer of the
  network are compared with the training set's by Mahalanobis distance (Lee et al., 2018,
  with Ledoit-Wolf-style shrinkage); above the training distances' ``quantile`` the study is
  flagged ``out_of_distribution``. Stored beside the weights as ``ood.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.config import Pipeline
from medvision.errors import CheckpointError, ConfigError
from medvision.io import Volume

__all__ = ["FeatureGuard", "QCFlag", "check_input"]

OOD_FILE = "ood.safetensors"


@dataclass(frozen=True)
class QCFlag:
    """One finding about an input: ``reject`` stops the study, ``warn`` is reported."""

    code: str
    severity: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"code": self.code, "severity": self.severity, "message": self.message}


def check_input(volume: Volume, pipeline: Pipeline) -> list[QCFlag]:
    """Check ``volume`` against the pipeline's input rules."""
    rules = pipeline.input
    flags: list[QCFlag] = []
    modality = volume.modality.upper()
    if rules.modalities and modality not in {m.upper() for m in rules.modalities}:
        flags.append(QCFlag("wrong_modality", "reject",
                            f"modality {modality} is not one this pipeline accepts "
                            f"({', '.join(rules.modalities)})"))
    body_part = str(volume.header.get("BodyPartExamined", "")).upper()
    if rules.body_parts and body_part and body_part not in {b.upper() for b in rules.body_parts}:
        flags.append(QCFlag("wrong_body_part", "reject",
                            f"body part {body_part} is not one this pipeline accepts "
                            f"({', '.join(rules.body_parts)})"))
    dims = volume.spatial_dims
    flat_3d = dims == 3 and volume.spatial_shape[2] == 1
    if pipeline.spatial_dims == 2 and dims == 3 and not flat_3d:
        flags.append(QCFlag("wrong_dimensionality", "reject",
                            f"a 3D volume ({volume.spatial_shape}) given to a 2D model"))
    if pipeline.spatial_dims == 3:
        if dims == 2 or flat_3d:
            flags.append(QCFlag("wrong_dimensionality", "reject", "a 2D image given to a 3D model"))
        elif min(volume.spatial_shape) < rules.min_slices:
            flags.append(QCFlag("too_few_slices", "reject",
                                f"{min(volume.spatial_shape)} slices, fewer than "
                                f"{rules.min_slices}"))
    if not np.all(np.isfinite(volume.array)):
        flags.append(QCFlag("non_finite", "reject", "the image holds NaN or infinite values"))
    elif float(volume.array.max()) == float(volume.array.min()):
        flags.append(QCFlag("constant_image", "reject", "the image is constant (no content)"))
    if rules.spacing_mm is not None:
        low, high = rules.spacing_mm
        spacing = volume.spacing
        if min(spacing) < low or max(spacing) > high:
            flags.append(QCFlag("implausible_spacing", "warn",
                                f"voxel size {tuple(round(s, 3) for s in spacing)} mm is outside "
                                f"the expected {low}-{high} mm"))
    if volume.skipped_files:
        names = ", ".join(Path(path).name for path, _ in volume.skipped_files[:5])
        more = len(volume.skipped_files) - 5
        flags.append(QCFlag("unreadable_files", "warn",
                            f"{len(volume.skipped_files)} file(s) of the series could not be "
                            f"decoded and were left out ({names}"
                            + (f" and {more} more" if more > 0 else "") + ")"))
    for warning in volume.warnings:
        flags.append(QCFlag("geometry_note", "warn", warning))
    return flags


def _pooled(output: Any) -> Any:
    if isinstance(output, tuple | list):
        output = output[0]
    return output.flatten(2).mean(dim=2) if output.dim() > 2 else output


@dataclass(frozen=True, eq=False)
class FeatureGuard:
    """Mahalanobis distance of pooled layer features to the training distribution."""

    layer: str
    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float

    @staticmethod
    def features(model: Any, layer: str, images: Iterable[Any]) -> np.ndarray:
        """Pooled ``layer`` activations for each batch of preprocessed images, ``(N, F)``."""
        import torch

        modules = dict(model.named_modules())
        if layer not in modules:
            raise ConfigError(f"qc.feature_layer '{layer}' is not a module of the network")
        captured: list[Any] = []
        handle = modules[layer].register_forward_hook(
            lambda _m, _i, out: captured.append(_pooled(out).detach()))
        try:
            model.eval()
            with torch.no_grad():
                for image in images:
                    model(image)
        finally:
            handle.remove()
        return torch.cat(captured).double().numpy()

    @classmethod
    def fit(cls, features: np.ndarray, *, layer: str, quantile: float) -> FeatureGuard:
        """Fit mean, shrunk covariance and the distance threshold on training features."""
        mean = features.mean(axis=0)
        centred = features - mean
        cov = centred.T @ centred / max(len(features) - 1, 1)
        shrink = min(1.0, features.shape[1] / max(len(features), 1))
        target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
        precision = np.linalg.pinv((1 - shrink) * cov + shrink * target)
        distances = np.sqrt(np.einsum("nf,fg,ng->n", centred, precision, centred))
        return cls(layer=layer, mean=mean, precision=precision,
                   threshold=float(np.quantile(distances, quantile)), quantile=quantile)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features``."""
        centred = np.atleast_2d(features) - self.mean
        return np.sqrt(np.einsum("nf,fg,ng->n", centred, self.precision, centred))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``ood.safetensors`` (arrays) with the rest as metadata."""
        import torch
        from safetensors.torch import save_file

        path = Path(folder) / OOD_FILE
        save_file({"mean": torch.from_numpy(self.mean), "precision": torch.from_numpy(self.precision)},
                  str(path), metadata={"layer": self.layer, "threshold": repr(self.threshold),
                                       "quantile": repr(self.quantile)})
        return path

    @classmethod
    def load(cls, weights: str | os.PathLike[str]) -> FeatureGuard | None:
        """The guard stored beside ``weights``, or ``None`` when there is none."""
        from safetensors import safe_open

        path = Path(weights).parent / OOD_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata()
                return cls(layer=meta["layer"], mean=handle.get_tensor("mean"),
                           precision=handle.get_tensor("precision"),
                           threshold=float(meta["threshold"]), quantile=float(meta["quantile"]))
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable OOD statistics ({e})") from e

    def describe(self) -> dict[str, Any]:
        """JSON summary (without the matrices)."""
        return {"layer": self.layer, "threshold": self.threshold, "quantile": self.quantile,
                "features": int(self.mean.shape[0])}
