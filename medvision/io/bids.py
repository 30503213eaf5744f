"""BIDS-style acquisition fields of a series, from its DICOM header (as dcm2niix writes them).

Only what the header states is written; nothing is estimated. Directions are given in
medvision's voxel frame (``I`` along a DICOM row, ``J`` down the rows as stored, ``K`` along
the slice normal): dcm2niix stores rows bottom-up, so its ``j`` is medvision's ``j-`` and the
other way round; ``i`` and ``k`` agree.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medvision.io.volume import Volume

__all__ = ["bids_sidecar", "fsl_table", "read_fsl_table", "write_sidecars"]


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _csa(ds: Any) -> dict[str, Any]:
    """Siemens' CSA image header tags (``{}`` when absent or unreadable)."""
    if "SIEMENS" not in str(ds.get("Manufacturer") or "").upper():
        return {}
    try:
        from nibabel.nicom import csareader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csa = csareader.get_csa_header(ds, "image")
        return dict((csa or {}).get("tags", {}))
    except Exception:  # noqa: BLE001 - a malformed CSA header just means "not recorded"
        return {}


def _items(tags: dict[str, Any], name: str) -> list[Any]:
    return list((tags.get(name) or {}).get("items") or [])


def bids_sidecar(ds: Any, *, slice_order: Sequence[int] | None = None) -> dict[str, Any]:
    """The acquisition fields of ``ds`` that BIDS names.

    Args:
        ds: the first instance of the series.
        slice_order: for a mosaic, the tile index of each slice of the volume in medvision's
            ``K`` order (to put SliceTiming in that order).
    """
    out: dict[str, Any] = {}
    for keyword, name in (("Modality", "Modality"), ("MagneticFieldStrength",
                                                      "MagneticFieldStrength"),
                          ("Manufacturer", "Manufacturer"),
                          ("ManufacturerModelName", "ManufacturersModelName"),
                          ("SeriesDescription", "SeriesDescription"),
                          ("ProtocolName", "ProtocolName")):
        value = ds.get(keyword)
        if value not in (None, ""):
            out[name] = _float(value) if name == "MagneticFieldStrength" else str(value)
    tr, te = _float(ds.get("RepetitionTime")), _float(ds.get("EchoTime"))
    if tr is not None:
        out["RepetitionTime"] = round(tr / 1000.0, 6)
    if te is not None:
        out["EchoTime"] = round(te / 1000.0, 6)
    flip = _float(ds.get("FlipAngle"))
    if flip is not None:
        out["FlipAngle"] = flip
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = _float(ds.get(keyword))
        if value is not None:
            out[keyword] = value
    axis = {"ROW": "i", "COL": "j"}.get(str(ds.get("InPlanePhaseEncodingDirection") or ""))
    if axis:
        out["PhaseEncodingAxis"] = axis
    tags = _csa(ds)
    times = [_float(t) for t in _items(tags, "MosaicRefAcqTimes")]
    if times and all(t is not None for t in times):
        ordered = [times[i] for i in slice_order] if slice_order is not None and len(
            slice_order) == len(times) else times
        out["SliceTiming"] = [round(float(t) / 1000.0, 6) for t in ordered]  # type: ignore[arg-type]
    positive = _items(tags, "PhaseEncodingDirectionPositive")
    if axis and positive:
        # positive: towards increasing index along the axis, in medvision's voxel frame
        # (dcm2niix's j is reversed, so its "j-" is this "j")
        out["PhaseEncodingDirection"] = axis + ("" if int(positive[0]) == 1 else "-")
    bandwidth = _float((_items(tags, "BandwidthPerPixelPhaseEncode") or [None])[0])
    matrix = ds.get("AcquisitionMatrix")
    if bandwidth and axis and matrix is not None and len(matrix) == 4:
        # reconstructed lines along the phase-encoding axis
        lines = int(ds.get("Rows") if axis == "j" else ds.get("Columns"))
        mosaic = _items(tags, "NumberOfImagesInMosaic")
        if mosaic:
            tiles = math.ceil(math.sqrt(int(mosaic[0])))
            lines //= tiles
        spacing = 1.0 / (bandwidth * lines)
        out["EffectiveEchoSpacing"] = round(spacing, 9)
        out["TotalReadoutTime"] = round(spacing * (lines - 1), 9)
    return out


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def fsl_table(volume: Volume) -> tuple[str, str]:
    """``.bval`` and ``.bvec`` text of a diffusion volume, in FSL's convention for the voxel
    order medvision writes: b-values in s/mm²; gradient directions along the voxel axes, with
    x negated when the affine's determinant is positive (FSL's radiological voxel order).
    dcm2niix stores rows bottom-up, so its x and y components are the negatives of these
    (the direction is the same up to sign, which diffusion models ignore)."""
    fourth = volume.fourth_axis
    if fourth is None or not fourth.b_values:
        raise ValueError("not a diffusion series")
    flip = -1.0 if np.linalg.det(volume.affine[:3, :3]) > 0 else 1.0
    vectors = np.array(fourth.gradients, dtype=float).reshape(-1, 3)
    vectors[:, 0] *= flip
    bval = " ".join(f"{b:g}" for b in fourth.b_values) + "\n"
    bvec = "".join(" ".join(f"{v:.6g}" for v in vectors[:, axis]) + "\n" for axis in range(3))
    return bval, bvec


def read_fsl_table(nifti: str | os.PathLike[str], affine: np.ndarray, *, count: int
                   ) -> tuple[tuple[float, ...], tuple[tuple[float, float, float], ...]] | None:
    """The ``.bval``/``.bvec`` beside a NIfTI file, as b-values and image-frame unit vectors
    (``None`` when absent, or not one entry per volume)."""
    stem = _stem(Path(nifti))
    bval, bvec = stem.with_suffix(".bval"), stem.with_suffix(".bvec")
    if not (bval.is_file() and bvec.is_file()):
        return None
    try:
        b = np.array(bval.read_text().split(), dtype=float)
        g = np.array([line.split() for line in bvec.read_text().splitlines() if line.strip()],
                     dtype=float)
    except (OSError, ValueError):
        return None
    if b.shape != (count,) or g.shape != (3, count):
        return None
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        g[0] *= -1
    return (tuple(float(v) for v in b),
            tuple((float(x), float(y), float(z)) for x, y, z in g.T))


def write_sidecars(volume: Volume, nifti: str | os.PathLike[str]) -> list[Path]:
    """Beside a written 4D NIfTI: a BIDS-style ``.json`` (and ``.bval``/``.bvec`` for
    diffusion). Returns the files written (none for an ordinary volume)."""
    fourth = volume.fourth_axis
    if fourth is None:
        return []
    stem = _stem(Path(nifti))
    sidecar: dict[str, Any] = dict(fourth.sidecar)
    sidecar.update({"ConversionSoftware": "medvision", "VolumeCount": volume.volumes,
                    "VolumesSeparatedBy": fourth.separated_by})
    if fourth.times_s:
        sidecar["VolumeTiming"] = list(fourth.times_s)
    written = [stem.with_suffix(".json")]
    written[0].write_text(json.dumps(sidecar, indent=2))
    if fourth.b_values:
        bval, bvec = fsl_table(volume)
        stem.with_suffix(".bval").write_text(bval)
        stem.with_suffix(".bvec").write_text(bvec)
        written += [stem.with_suffix(".bval"), stem.with_suffix(".bvec")]
    return written
