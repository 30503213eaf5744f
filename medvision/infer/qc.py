"""Input checks before a study is scored: fit to the pipeline, and distance from training data.

:func:`check_input` applies the rules from the pipeline file (modality, body part,
dimensionality, slice count, voxel size, finite intensities); a failed hard rule rejects the
study. The out-of-distribution guard is :class:`medvision.models.ood.FeatureGuard`, part of
the model bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvision.config import Pipeline
from medvision.io import Volume

__all__ = ["QCFlag", "check_input"]


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
