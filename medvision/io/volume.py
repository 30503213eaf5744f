"""The :class:`Volume` passed from ``io`` to every later stage, and its geometry helpers.

Layout, everywhere in medvision: the array is channels first, ``(C, I, J)`` for 2D images and
``(C, I, J, K)`` for volumes, where ``I`` runs along an image row (DICOM column index), ``J``
down the rows and ``K`` across slices. The 4x4 ``affine`` maps a voxel index ``(i, j, k, 1)`` to
world coordinates in millimetres, RAS+ (nibabel's and MONAI's convention). 2D images carry a
4x4 affine too; their third column is the slice normal scaled by the slice thickness (1 mm when
unknown).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from medvision.errors import GeometryError

__all__ = ["LPS_TO_RAS", "FourthAxis", "Volume", "orientation_code", "reduce_volumes"]

#: Multiplying a DICOM (LPS+) world point or affine by this gives RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def orientation_code(affine: np.ndarray) -> str:
    """The direction each voxel axis points to, as three letters (for example ``"LPS"``).

    Args:
        affine: 4x4 voxel-to-RAS+ affine.

    Returns:
        One of R/L, A/P, S/I per voxel axis, nibabel's ``aff2axcodes`` convention.
    """
    from nibabel.orientations import aff2axcodes

    return "".join(str(c) for c in aff2axcodes(affine))


@dataclass(frozen=True)
class FourthAxis:
    """What the channel axis of a multi-volume series holds (fMRI, diffusion, perfusion...).

    A series of several volumes over time or diffusion direction is one :class:`Volume` whose
    channels are its volumes, in acquisition order (MONAI's channel-first convention for 4D
    images). This says what separates them and what each one is.

    Attributes:
        kind: ``time`` (fMRI, perfusion, cine, dynamic contrast) or ``diffusion``.
        separated_by: what the volumes were told apart by (DICOM keywords, vendor tags,
            ``InstanceNumber order``, or ``NIfTI 4th axis``).
        times_s: each volume's acquisition time, seconds after the first (when known).
        b_values: diffusion b-values in s/mm² (diffusion).
        gradients: diffusion gradient directions as unit vectors in the image frame: along
            the ``I``, ``J``, ``K`` voxel axes (zero for b = 0); see docs/architecture.md for
            the relation to FSL's and dcm2niix's ``.bvec``.
        repetition_time_s: the volume repetition time, when the header gives it.
        sidecar: BIDS-style acquisition fields (RepetitionTime, EchoTime, SliceTiming,
            PhaseEncodingDirection, TotalReadoutTime...) the header allows.
    """

    kind: str
    separated_by: str
    times_s: tuple[float, ...] = ()
    b_values: tuple[float, ...] = ()
    gradients: tuple[tuple[float, float, float], ...] = ()
    repetition_time_s: float | None = None
    sidecar: Mapping[str, Any] = field(default_factory=dict)

    def describe(self, count: int) -> dict[str, Any]:
        """A JSON summary (``medvision info``)."""
        out: dict[str, Any] = {"volumes": count, "kind": self.kind,
                               "separated_by": self.separated_by}
        if self.repetition_time_s is not None:
            out["repetition_time_s"] = self.repetition_time_s
        if self.b_values:
            out["b_values"] = sorted({round(b, 1) for b in self.b_values})
        return out


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class Volume:
    """An image with its geometry, as read from disk.

    Attributes:
        array: float32 voxels, channels first: ``(C, I, J)`` or ``(C, I, J, K)``. Read-only.
        affine: 4x4 voxel index to RAS+ millimetres. Read-only.
        modality: DICOM modality code (``CT``, ``MR``, ``CR`` ...) or ``OT`` when unknown.
        source_uids: SOP Instance UIDs of the DICOM instances the voxels came from, in slice
            order (empty for non-DICOM files).
        header: a summary of the source header with no patient identity (an allowlist of
            technical attributes such as series UID, manufacturer, transfer syntax).
        warnings: human-readable notes about the geometry or data (tilt, gaps, resampling).
        source: the path the volume was read from.
        skipped_files: ``(path, reason)`` of files of the series that could not be decoded
            and were left out (see ``DicomSeries.load(skip_unreadable=True)``).
        fourth_axis: for a multi-volume series (4D), what the channels are; ``None`` for
            an ordinary image, whose channels are colour components.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    source_uids: tuple[str, ...] = ()
    header: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    source: str = ""
    skipped_files: tuple[tuple[str, str], ...] = ()
    fourth_axis: FourthAxis | None = None

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        if array.ndim not in (3, 4):
            raise GeometryError(
                f"{self.source or 'volume'}: expected a channel-first array with 2 or 3 spatial "
                f"dimensions, got shape {array.shape}"
            )
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"{self.source or 'volume'}: affine must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise GeometryError(f"{self.source or 'volume'}: affine is singular")
        object.__setattr__(self, "array", _readonly(array))
        object.__setattr__(self, "affine", _readonly(affine))
        object.__setattr__(self, "header", MappingProxyType(dict(self.header)))
        object.__setattr__(self, "source_uids", tuple(self.source_uids))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "skipped_files", tuple(self.skipped_files))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled through the constructor (the header's read-only view cannot be pickled;
        reader processes send volumes back to the analysing one)."""
        return (type(self), (np.array(self.array), np.array(self.affine), self.modality,
                             self.source_uids, dict(self.header), self.warnings, self.source,
                             self.skipped_files, self.fourth_axis))

    @property
    def spatial_dims(self) -> int:
        """2 for an image, 3 for a volume."""
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The array's shape without the channel axis."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def volumes(self) -> int:
        """Number of volumes of a 4D series (1 for an ordinary image)."""
        return self.channels if self.fourth_axis is not None else 1

    @property
    def channels(self) -> int:
        """Number of channels (1 for grey, 3 for colour)."""
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis, from the affine's column norms."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(v) for v in norms[: self.spatial_dims])

    @property
    def orientation(self) -> str:
        """Three-letter orientation code of the voxel axes, for example ``"LPS"``."""
        return orientation_code(self.affine)

    def with_array(self, array: np.ndarray, *, warnings: tuple[str, ...] = ()) -> Volume:
        """A copy with new voxels on the same grid (same spatial shape and affine).

        Args:
            array: channel-first array whose spatial shape equals this volume's.
            warnings: extra warnings appended to this volume's.
        """
        array = np.asarray(array)
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise GeometryError(
                f"{self.source or 'volume'}: new array has spatial shape {array.shape[1:]}, "
                f"expected {self.spatial_shape}"
            )
        return Volume(
            array=array,
            affine=self.affine,
            modality=self.modality,
            source_uids=self.source_uids,
            header=self.header,
            warnings=self.warnings + tuple(warnings),
            source=self.source,
        )


def reduce_volumes(volume: Volume, rule: str, *, b_value: float | None = None,
                   channels: int = 1) -> Volume:
    """Make a 4D series fit a pipeline, as its ``input.four_d`` rule says.

    ``first``: the first volume; ``mean``: the mean over volumes; ``b_value``: the mean of the
    volumes acquired at ``b_value`` (diffusion); ``channels``: the volumes as channels (their
    number must be ``channels``); ``reject``: refuse. An ordinary volume is returned as is.

    Raises:
        GeometryError: the rule cannot be applied (the message says why).
    """
    fourth = volume.fourth_axis
    if fourth is None:
        return volume
    array = np.asarray(volume.array)
    what = f"a 4D series of {volume.volumes} {fourth.kind} volumes"
    if rule == "reject":
        raise GeometryError(f"{what} given to a pipeline for single volumes (its "
                            "input.four_d is reject; first, mean, b_value or channels would "
                            "select)")
    if rule == "first":
        chosen, note = array[:1], "the first volume of a 4D series"
    elif rule == "mean":
        chosen, note = array.mean(axis=0, keepdims=True), f"the mean of {volume.volumes} volumes"
    elif rule == "b_value":
        picked = [k for k, b in enumerate(fourth.b_values)
                  if b_value is not None and abs(b - b_value) <= max(1.0, 0.01 * b_value)]
        if not picked:
            have = sorted({round(b) for b in fourth.b_values}) or "none"
            raise GeometryError(f"{what} has no volume at b = {b_value} (b-values: {have})")
        chosen = array[picked].mean(axis=0, keepdims=True)
        note = f"the mean of the {len(picked)} volume(s) at b = {b_value:g}"
    elif rule == "channels":
        if volume.volumes != channels:
            raise GeometryError(f"{what}: the model takes {channels} channel(s)")
        return volume
    else:
        raise GeometryError(f"unknown input.four_d rule {rule!r}")
    return Volume(array=chosen, affine=volume.affine, modality=volume.modality,
                  source_uids=volume.source_uids, header=volume.header,
                  warnings=(*volume.warnings, f"analysed {note}"), source=volume.source,
                  skipped_files=volume.skipped_files)
