"""Slice-position analysis and resampling of irregular slice stacks onto a regular grid.

A DICOM series is a stack of 2D planes, each placed in space by its own Image Position. The
planes share an orientation (row direction ``r``, column direction ``c``, normal ``n``), but
their positions need not form a regular grid:

* **gantry tilt**: the positions drift in-plane from slice to slice (a sheared stack);
* **uneven spacing**: the distances along ``n`` vary;
* **missing slices**: some distances are whole multiples of the usual one.

A NIfTI affine cannot represent any of these without shear or loss. :func:`regrid_slices`
builds an orthogonal grid aligned with ``r``, ``c`` and ``n`` that covers every input plane
(so no voxel is cropped away), shifts each plane in-plane to its true place (linear
interpolation) and interpolates linearly along ``n`` between neighbouring planes. The first and
last output planes lie exactly on the first and last input planes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medvision.errors import GeometryError, SeriesAssemblyError
from medvision.io.volume import LPS_TO_RAS

__all__ = ["SliceGeometry", "analyse_slices", "regrid_slices"]

#: Relative tolerance on slice distances before a stack counts as unevenly spaced.
GAP_TOLERANCE = 0.01
#: In-plane drift, as a fraction of a pixel, before a stack counts as tilted.
DRIFT_TOLERANCE = 0.05


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    """Where a stack's planes are, and the regular grid the volume is put on.

    Attributes:
        s: position of each plane along the normal, mm, ascending.
        inplane: each plane's in-plane offset from the first, ``(K, 2)`` mm along ``r``, ``c``.
        regular: whether the planes already form a regular orthogonal grid.
        problems: what makes the grid irregular, in words (empty when regular).
        tilt_degrees: angle between the stacking direction and the normal.
        slice_spacing: spacing of the output grid along the normal, mm.
        output_shape: (I, J, K) of the output grid.
        affine_ras: 4x4 voxel-to-RAS+ affine of the output grid.
        shifts: per input plane, its ``(I, J)`` voxel offset inside the output grid.
    """

    s: np.ndarray
    inplane: np.ndarray
    regular: bool
    problems: tuple[str, ...]
    tilt_degrees: float
    slice_spacing: float
    output_shape: tuple[int, int, int]
    affine_ras: np.ndarray
    shifts: np.ndarray


def analyse_slices(*, positions: np.ndarray, orientation: np.ndarray,
                   pixel_spacing: tuple[float, float], matrix: tuple[int, int],
                   normal: np.ndarray, where: str,
                   slice_spacing: float | None = None) -> SliceGeometry:
    """Analyse sorted plane positions and plan the output grid.

    Args:
        positions: ``(K, 3)`` Image Position (Patient) of each plane, LPS mm, sorted along
            the normal.
        orientation: Image Orientation (Patient), 6 direction cosines.
        pixel_spacing: (between rows, between columns), mm.
        matrix: (columns, rows) of one plane.
        normal: unit slice normal (LPS).
        where: file and series, for messages.
        slice_spacing: output spacing along the normal; default: the usual distance, or the
            lower quartile of distances when they vary (keeps the finest part's resolution).

    Raises:
        SeriesAssemblyError: two planes share a position.
    """
    r, c = orientation[:3], orientation[3:]
    n = normal / np.linalg.norm(normal)
    if abs(float(np.dot(r, c))) > 1e-3 or abs(float(np.dot(n, r))) > 1e-3:
        raise GeometryError(f"{where}: image orientation is not orthonormal ({orientation})")
    row_sp, col_sp = pixel_spacing
    cols, rows = matrix
    rel = positions - positions[0]
    s = positions @ n
    gaps = np.diff(s)
    if np.any(gaps < 1e-3):
        dup = int(np.sum(gaps < 1e-3))
        raise SeriesAssemblyError(
            f"{where}: {dup} plane(s) share a position with another and nothing (echo, time, "
            "stack) separates them; select the instances of one volume"
        )
    inplane = np.stack([rel @ r, rel @ c], axis=1)
    span = float(s[-1] - s[0])
    drift = float(np.max(np.abs(inplane / np.array([col_sp, row_sp]))))
    problems: list[str] = []
    tilt = 0.0
    if drift > DRIFT_TOLERANCE:
        tilt = math.degrees(math.atan2(float(np.linalg.norm(inplane[-1])), span))
        problems.append(f"gantry tilt: slices drift in-plane by {tilt:.2f} degrees")
    median = float(np.median(gaps))
    uneven = float(np.max(np.abs(gaps - median))) > max(0.01, GAP_TOLERANCE * median)
    default_spacing = median
    if uneven:
        ratio = gaps / median
        whole = np.abs(ratio - np.round(ratio)) < 0.05
        if np.all(whole) and np.all(np.round(ratio) >= 1):
            missing = int(np.sum(np.round(ratio) - 1))
            places = int(np.sum(np.round(ratio) > 1))
            problems.append(f"missing slices: about {missing} slice(s) absent at {places} "
                            f"place(s) (usual spacing {median:.3f} mm)")
        else:
            default_spacing = float(np.percentile(gaps, 25))
            problems.append(f"uneven slice spacing: {gaps.min():.3f} to {gaps.max():.3f} mm")
    regular = not problems
    if regular:
        affine = np.eye(4)
        affine[:3, 0] = r * col_sp
        affine[:3, 1] = c * row_sp
        affine[:3, 2] = rel[-1] / (len(s) - 1)
        affine[:3, 3] = positions[0]
        return SliceGeometry(
            s=s, inplane=inplane, regular=True, problems=(), tilt_degrees=0.0,
            slice_spacing=median, output_shape=(cols, rows, len(s)),
            affine_ras=LPS_TO_RAS @ affine, shifts=np.zeros((len(s), 2)),
        )
    target = float(slice_spacing or default_spacing)
    n_out = int(math.ceil(span / target - 1e-6)) + 1
    step = span / (n_out - 1)
    low = inplane.min(axis=0)
    extent = (inplane.max(axis=0) - low) / np.array([col_sp, row_sp])
    shape = (cols + int(math.ceil(extent[0] - 1e-3)), rows + int(math.ceil(extent[1] - 1e-3)),
             n_out)
    affine = np.eye(4)
    affine[:3, 0] = r * col_sp
    affine[:3, 1] = c * row_sp
    affine[:3, 2] = n * step
    affine[:3, 3] = positions[0] + low[0] * r + low[1] * c
    shifts = (inplane - low) / np.array([col_sp, row_sp])
    return SliceGeometry(
        s=s, inplane=inplane, regular=False, problems=tuple(problems), tilt_degrees=tilt,
        slice_spacing=step, output_shape=shape, affine_ras=LPS_TO_RAS @ affine, shifts=shifts,
    )


def regrid_slices(stacked: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Resample ``(C, I, J, K)`` planes onto ``geometry``'s regular grid.

    Voxels of the output grid that no input plane covers get the input's minimum value.
    """
    from scipy import ndimage

    channels = stacked.shape[0]
    out_i, out_j, out_k = geometry.output_shape
    fill = float(stacked.min())
    placed = np.empty((channels, out_i, out_j, stacked.shape[-1]), dtype=np.float32)
    for k in range(stacked.shape[-1]):
        di, dj = geometry.shifts[k]
        for ch in range(channels):
            ndimage.affine_transform(
                stacked[ch, :, :, k], np.eye(2), offset=(-di, -dj),
                output_shape=(out_i, out_j), output=placed[ch, :, :, k], order=1,
                mode="constant", cval=fill,
            )
    targets = geometry.s[0] + np.arange(out_k) * geometry.slice_spacing
    lower = np.clip(np.searchsorted(geometry.s, targets, side="right") - 1, 0, len(geometry.s) - 2)
    weight = (targets - geometry.s[lower]) / (geometry.s[lower + 1] - geometry.s[lower])
    weight = np.clip(weight, 0.0, 1.0).astype(np.float32)
    return placed[..., lower] * (1 - weight) + placed[..., lower + 1] * weight
