"""One entry point for every format: detect, list what a path holds, read, write."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvision.errors import DataError, SeriesAssemblyError, UnsupportedFormatError
from medvision.io.dicom_files import iter_candidate_files
from medvision.io.dicom_series import DicomSeries, Irregular, scan_dicom
from medvision.io.image2d import read_image2d
from medvision.io.nifti import read_itk, read_nifti, write_nifti
from medvision.io.volume import Volume

__all__ = ["Inventory", "SourceEntry", "detect_format", "inventory", "read_volume",
           "write_volume"]

Format = Literal["dicom", "nifti", "itk", "image2d"]

_SUFFIXES: dict[str, Format] = {
    ".nii": "nifti", ".nii.gz": "nifti", ".hdr": "nifti", ".img": "nifti",
    ".nrrd": "itk", ".nhdr": "itk", ".mha": "itk", ".mhd": "itk",
    ".png": "image2d", ".jpg": "image2d", ".jpeg": "image2d", ".bmp": "image2d",
    ".tif": "image2d", ".tiff": "image2d",
}
_READERS: dict[Format, Callable[[Path], Volume]] = {
    "nifti": read_nifti, "itk": read_itk, "image2d": read_image2d,
}


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format of a file, from its name; anything unnamed is tried as DICOM."""
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return "dicom"


@dataclass(frozen=True, eq=False)
class SourceEntry:
    """One image a path holds: a DICOM series, or a single NIfTI/NRRD/PNG... file."""

    format: Format
    source: str
    series: DicomSeries | None = None

    def load(self, *, irregular: Irregular = "resample", skip_unreadable: bool = False) -> Volume:
        """Read the voxels (see :meth:`DicomSeries.load` for the options)."""
        if self.series is not None:
            return self.series.load(irregular=irregular, skip_unreadable=skip_unreadable)
        return _READERS[self.format](Path(self.source))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (for DICOM from headers alone)."""
        if self.series is not None:
            return {"format": "dicom", "source": self.source, **self.series.describe()}
        volume = self.load()
        return {
            "format": self.format, "source": self.source, "series_uid": None,
            "series_number": None, "description": "", "modality": volume.modality,
            "matrix": list(volume.spatial_shape[:2]), "shape": list(volume.spatial_shape),
            "spacing": [round(s, 6) for s in volume.spacing], "orientation": volume.orientation,
            "slices": volume.spatial_shape[2] if volume.spatial_dims == 3 else 1,
            "volumes": volume.volumes,
            **({"fourth_axis": volume.fourth_axis.describe(volume.volumes)}
               if volume.fourth_axis else {}),
            "transfer_syntax": "", "files": 1, "warnings": list(volume.warnings),
            "error": None,
        }


@dataclass(frozen=True)
class Inventory:
    """Everything found under some paths, and the files that could not be used.

    ``owners``: for rejected DICOM files whose header was readable, their (Study Instance UID,
    Series Instance UID).
    """

    entries: tuple[SourceEntry, ...]
    rejected: tuple[tuple[str, str], ...] = field(default=())
    owners: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def inventory(paths: Iterable[str | os.PathLike[str]]) -> Inventory:
    """List the images under ``paths`` (files and folders, recursively) without decoding pixels.

    Files named with a NIfTI/NRRD/MHA/PNG/JPEG suffix are one entry each; everything else is
    scanned as DICOM and assembled into series.
    """
    others: list[SourceEntry] = []
    dicom: list[Path] = []
    for path in iter_candidate_files(paths):
        fmt = detect_format(path)
        if fmt == "dicom":
            dicom.append(path)
        else:
            others.append(SourceEntry(format=fmt, source=str(path)))
    scan = scan_dicom(dicom) if dicom else None
    entries = [SourceEntry(format="dicom", source=_series_source(s), series=s)
               for s in (scan.series if scan else ())]
    return Inventory(entries=tuple(entries + others),
                     rejected=scan.rejected if scan else (),
                     owners=scan.owners if scan else {})


def _series_source(series: DicomSeries) -> str:
    paths = series.paths
    return paths[0] if len(paths) == 1 else os.path.commonpath(paths)


def read_volume(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                series: str | int | None = None,
                irregular: Irregular = "resample") -> Volume:
    """Read one image from a file, a folder (DICOM, recursive) or a DICOMDIR.

    Args:
        path: a file, a folder, or a list of files of one series.
        series: which series when the path holds several: its index in :func:`inventory`
            order or its Series Instance UID (``"UID.N"`` for split series).
        irregular: ``"resample"`` tilted or unevenly spaced DICOM onto a regular grid (the
            default), or ``"error"`` to refuse such series.

    Raises:
        DataError: (a subclass) with a message naming the file and the problem.
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_file() and detect_format(paths[0]) != "dicom":
        return _READERS[detect_format(paths[0])](Path(paths[0]))
    found = inventory(paths)
    where = ", ".join(str(p) for p in paths)
    if not found.entries:
        reasons = "; ".join(reason for _, reason in found.rejected[:3])
        raise UnsupportedFormatError(
            f"{where}: no readable image found" + (f" ({reasons})" if reasons else "")
        )
    entry = _select(found.entries, series, where)
    return entry.load(irregular=irregular)


def _select(entries: Sequence[SourceEntry], series: str | int | None, where: str) -> SourceEntry:
    if series is None:
        if len(entries) == 1:
            return entries[0]
        listing = "; ".join(
            f"[{i}] {e.series.key if e.series else e.source} ({e.series.modality if e.series else e.format})"
            for i, e in enumerate(entries)
        )
        raise SeriesAssemblyError(
            f"{where}: holds {len(entries)} images; choose one with series=INDEX or UID "
            f"(CLI: --series): {listing}"
        )
    if isinstance(series, int) or (isinstance(series, str) and series.isdigit()):
        index = int(series)
        if 0 <= index < len(entries):
            return entries[index]
        raise SeriesAssemblyError(f"{where}: series index {index} out of range 0..{len(entries) - 1}")
    for entry in entries:
        if entry.series is not None and entry.series.key == series:
            return entry
    raise SeriesAssemblyError(f"{where}: no series with UID {series}")


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` to ``path`` (``.nii`` or ``.nii.gz``).

    Raises:
        UnsupportedFormatError: any other suffix.
        DataError: the file cannot be written.
    """
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise UnsupportedFormatError(f"{path}: can only write NIfTI (.nii or .nii.gz)")
    try:
        return write_nifti(volume, path)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e})") from e
