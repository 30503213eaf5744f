"""Assembling DICOM frames into series and series into correctly placed volumes.

Frames are grouped by Series Instance UID, then split where orientation or matrix size differ
(a three-plane localiser becomes three series) and, when frames share a position, by echo,
time or stack. Each series is sorted along its slice normal. The slice positions are checked:
gantry tilt (positions that drift in-plane), uneven spacing and missing slices are detected and,
by default, the volume is resampled onto a regular orthogonal grid in the right physical place
(see :mod:`medvision.io.regrid`), with a warning saying so. A wrong affine is never returned.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medvision.errors import DataError, GeometryError, InvalidDicomError, SeriesAssemblyError
from medvision.io.bids import bids_sidecar
from medvision.io.boundary import reading
from medvision.io.dicom_files import (
    DicomFrame,
    dicomdir_files,
    frames_of,
    header_summary,
    iter_candidate_files,
    read_header,
)
from medvision.io.dicom_pixels import stack_frames
from medvision.io.header_checks import check_dataset_uids
from medvision.io.multivolume import repeats_positions, separate_volumes
from medvision.io.regrid import SliceGeometry, analyse_slices, regrid_slices
from medvision.io.volume import LPS_TO_RAS, FourthAxis, Volume, orientation_code

__all__ = ["DicomScan", "DicomSeries", "scan_dicom"]

log = logging.getLogger(__name__)

Irregular = Literal["resample", "error"]


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """One assembled series: frames in slice order plus what their headers say about geometry.

    Attributes:
        key: Series Instance UID, with ``.N`` appended when one UID was split.
        frames: the frames in slice order.
        header: technical summary of the first instance (no patient identity).
        geometry: slice analysis (tilt, spacing, gaps), or ``None`` for a single frame or
            frames without position information.
        warnings: notes on anything unusual found while assembling.
        error: why this series cannot be loaded, found from its headers alone, or ``None``.
        fourth_axis: for a series of several volumes (4D), what separates them; ``frames``
            then holds the volumes one after the other, each sorted along the normal.
        volume_size: slices per volume of a 4D series.
        notes: facts about the series worth showing that are not problems (4D layout).
    """

    key: str
    frames: tuple[DicomFrame, ...]
    header: dict[str, Any]
    geometry: SliceGeometry | None
    warnings: tuple[str, ...]
    error: str | None = None
    fourth_axis: FourthAxis | None = None
    volume_size: int = 0
    notes: tuple[str, ...] = ()

    @property
    def volumes(self) -> int:
        """Number of volumes (1 unless the series is 4D)."""
        return len(self.frames) // self.volume_size if self.fourth_axis else 1

    @property
    def modality(self) -> str:
        """DICOM modality code, ``OT`` when missing."""
        return str(self.header.get("Modality") or "OT")

    @property
    def matrix(self) -> tuple[int, int]:
        """(columns, rows) of one frame."""
        return self.frames[0].columns, self.frames[0].rows

    @property
    def paths(self) -> tuple[str, ...]:
        """The files this series comes from, without repeats, in slice order."""
        return tuple(dict.fromkeys(f.path for f in self.frames))

    def describe(self) -> dict[str, Any]:
        """What ``medvision info`` shows about this series, from headers only."""
        affine, shape = self._planned_grid()
        return {
            "series_uid": self.key,
            "series_number": self.header.get("SeriesNumber"),
            "description": self.header.get("SeriesDescription", ""),
            "modality": self.modality,
            "matrix": list(self.matrix),
            "shape": list(shape),
            "spacing": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)][
                : len(shape)],
            "orientation": orientation_code(affine),
            "slices": len(self.frames) // self.volumes,
            "volumes": self.volumes,
            **({"fourth_axis": self.fourth_axis.describe(self.volumes),
                "notes": list(self.notes)} if self.fourth_axis else {}),
            "transfer_syntax": self.header.get("TransferSyntax", ""),
            "files": len(self.paths),
            "warnings": list(self.warnings),
            "error": self.error,
        }

    def _planned_grid(self) -> tuple[np.ndarray, tuple[int, ...]]:
        if self.geometry is not None:
            return self.geometry.affine_ras, self.geometry.output_shape
        return _flat_affine(self.frames), _flat_shape(self.frames)

    def load(self, *, irregular: Irregular = "resample", skip_unreadable: bool = False) -> Volume:
        """Decode the pixels and return the volume on a regular grid.

        Args:
            irregular: what to do with gantry tilt, uneven spacing or missing slices:
                ``"resample"`` onto a regular grid (default) or ``"error"``.
            skip_unreadable: leave out instances whose pixel data cannot be decoded (listed
                in ``Volume.skipped_files`` and warned about; the gap they leave is treated
                like any missing slice) instead of failing the whole series.

        Raises:
            GeometryError: irregular geometry and ``irregular="error"``.
            InvalidDicomError: pixel data cannot be decoded (every instance, with
                ``skip_unreadable``).
        """
        if self.error is not None:
            raise SeriesAssemblyError(self.error)
        failures: dict[str, str] | None = {} if skip_unreadable else None
        with reading(self.frames[0].path, f"series {self.key}", InvalidDicomError):
            stacked = stack_frames(self.frames, failures)  # (C, I, J, K)
            if self.fourth_axis is not None:
                return self._volume4d(stacked, irregular, failures or {})
            series = self
            if failures:
                keep = [k for k, f in enumerate(self.frames) if f.path not in failures]
                series = _make_series(self.key, [self.frames[k] for k in keep], split=False)
                if series.error is not None:
                    raise SeriesAssemblyError(
                        f"{series.error} (after leaving out {len(failures)} unreadable "
                        "file(s))")
                stacked = stacked[..., keep]
                series = replace(series, warnings=tuple(dict.fromkeys(
                    (*self.warnings, *series.warnings))))
            return series._volume(stacked, irregular,
                                   tuple(sorted((failures or {}).items())))

    def _volume4d(self, stacked: np.ndarray, irregular: Irregular,
                  failures: dict[str, str]) -> Volume:
        """One Volume whose channels are the volumes; volumes with an unreadable plane are
        left out (and said so)."""
        fourth = self.fourth_axis
        assert fourth is not None
        size, count = self.volume_size, self.volumes
        if stacked.shape[0] != 1:
            raise SeriesAssemblyError(f"{self.frames[0].path}: series {self.key} is a 4D "
                                      "series of colour images, which is not supported")
        keep = [t for t in range(count) if not any(
            f.path in failures for f in self.frames[t * size:(t + 1) * size])]
        if not keep:
            raise InvalidDicomError(f"{self.frames[0].path}: series {self.key}: every volume "
                                    "has an undecodable plane")
        warnings = list(self.warnings)
        if len(keep) < count:
            warnings.append(f"{count - len(keep)} of {count} volumes left out: a plane of "
                            "each could not be decoded")
        first = replace(self, frames=self.frames[:size], fourth_axis=None)
        parts = [first._volume(stacked[..., t * size:(t + 1) * size], irregular, ())
                 for t in keep]
        def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[t] for t in keep) if len(values) == count else values

        axis = replace(fourth, times_s=pick(fourth.times_s), b_values=pick(fourth.b_values),
                       gradients=pick(fourth.gradients))
        return replace(parts[0], array=np.concatenate([p.array for p in parts], axis=0),
                       source_uids=tuple(dict.fromkeys(f.sop_instance_uid for f in self.frames)),
                       source=os.path.commonpath(self.paths) if len(self.paths) > 1
                       else self.paths[0], warnings=tuple(dict.fromkeys(warnings)),
                       skipped_files=tuple(sorted(failures.items())), fourth_axis=axis)

    def _volume(self, stacked: np.ndarray, irregular: Irregular,
                skipped: tuple[tuple[str, str], ...]) -> Volume:
        warnings = list(self.warnings)
        if self.geometry is None:
            affine = _flat_affine(self.frames)
            array = stacked[..., 0] if stacked.shape[-1] == 1 else stacked
        elif self.geometry.regular:
            affine = self.geometry.affine_ras
            array = stacked
        elif irregular == "error":
            raise GeometryError(
                f"{self.frames[0].path}: series {self.key} is not on a regular grid "
                f"({'; '.join(self.geometry.problems)}); pass irregular='resample' "
                "(CLI: --irregular resample) to resample it"
            )
        else:
            array = regrid_slices(stacked, self.geometry)
            affine = self.geometry.affine_ras
        return Volume(
            array=array,
            affine=affine,
            modality=self.modality,
            source_uids=tuple(dict.fromkeys(f.sop_instance_uid for f in self.frames)),
            header=self.header,
            warnings=tuple(warnings),
            source=os.path.commonpath(self.paths) if len(self.paths) > 1 else self.paths[0],
            skipped_files=skipped,
        )


def _flat_affine(frames: Sequence[DicomFrame]) -> np.ndarray:
    """Affine for a single frame, or a frame stack without per-frame positions (RAS)."""
    first = frames[0]
    row_sp, col_sp = first.pixel_spacing or (1.0, 1.0)
    if first.orientation is not None:
        r, c = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    else:
        r, c = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(r, c)
    step = float(first.dataset.get("SpacingBetweenSlices") or first.slice_thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = r * col_sp
    affine[:3, 1] = c * row_sp
    affine[:3, 2] = normal * step
    affine[:3, 3] = first.position if first.position is not None else (0.0, 0.0, 0.0)
    return LPS_TO_RAS @ affine


def _flat_shape(frames: Sequence[DicomFrame]) -> tuple[int, ...]:
    first = frames[0]
    if len(frames) == 1:
        return (first.columns, first.rows)
    return (first.columns, first.rows, len(frames))


@dataclass(frozen=True)
class DicomScan:
    """Result of scanning files and folders: the series found and the files that were not.

    ``owners`` maps a rejected file whose header could be read to its (Study Instance UID,
    Series Instance UID), so it can be reported with its study.
    """

    series: tuple[DicomSeries, ...]
    rejected: tuple[tuple[str, str], ...]
    owners: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def scan_dicom(paths: Iterable[str | os.PathLike[str]]) -> DicomScan:
    """Read the headers of every DICOM file under ``paths`` and assemble series.

    A DICOMDIR contributes the files it references. Files that are not DICOM images (or are
    unreadable) are listed in ``rejected`` with the reason; they do not stop the scan.
    """
    frames: list[DicomFrame] = []
    rejected: list[tuple[str, str]] = []
    owners: dict[str, tuple[str, str]] = {}
    seen: set[Path] = set()
    queue = list(iter_candidate_files(paths))
    while queue:
        path = queue.pop(0)
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        ds = None
        try:
            with reading(path, "DICOM file", InvalidDicomError):
                ds = read_header(path)
                if "DirectoryRecordSequence" in ds:
                    queue.extend(dicomdir_files(ds, path))
                    continue
                # every UID used downstream (grouping, reports, DICOM results, paths) is
                # checked here, where it enters, and the file refused naming the attribute
                try:
                    check_dataset_uids(ds, required=(), registered_root=False)
                except InvalidDicomError as e:
                    raise InvalidDicomError(f"{path}: {e}") from e
                found = frames_of(ds, path)
                ds.get("SeriesNumber")  # read by assembly: a malformed value fails here
        except DataError as e:
            log.debug("skipping %s", e)
            rejected.append((str(path), str(e)))
            owner = _owner(ds)
            if owner is not None:
                owners[str(path)] = owner
            continue
        frames.extend(found)
    return DicomScan(series=tuple(assemble(frames)), rejected=tuple(rejected), owners=owners)


def _owner(ds: Any) -> tuple[str, str] | None:
    """(study UID, series UID) of a dataset whose header was read, when both are readable."""
    if ds is None:
        return None
    try:
        study, series = str(ds.get("StudyInstanceUID") or ""), str(ds.get("SeriesInstanceUID") or "")
    except Exception:  # noqa: BLE001 - a malformed UID just means "owner unknown"
        return None
    return (study, series) if study else None


def assemble(frames: Sequence[DicomFrame]) -> list[DicomSeries]:
    """Group frames into series, split inconsistent groups and sort each along its normal."""
    unique: dict[tuple[str, int, int], DicomFrame] = {}
    duplicates: dict[str, int] = defaultdict(int)
    for frame in frames:
        kept = unique.setdefault(frame.key, frame)
        if kept is not frame:
            duplicates[str(kept.dataset.get("SeriesInstanceUID") or "unknown-series")] += 1
    groups: dict[tuple[Any, ...], list[DicomFrame]] = defaultdict(list)
    for frame in unique.values():
        series_uid = str(frame.dataset.get("SeriesInstanceUID") or "unknown-series")
        orientation = (None if frame.orientation is None
                       else tuple(round(v, 3) for v in frame.orientation))
        has_geometry = frame.orientation is not None and frame.position is not None
        # Images without a position are separate 2D images, except frames of one file.
        loose = None if has_geometry else frame.path
        groups[(series_uid, orientation, frame.rows, frame.columns, loose)].append(frame)

    by_uid: dict[str, list[list[DicomFrame]]] = defaultdict(list)
    for group, members in groups.items():
        for part in _split_duplicates(members):
            by_uid[group[0]].append(part)

    out: list[DicomSeries] = []
    for uid, parts in by_uid.items():
        parts.sort(key=lambda p: (p[0].path, p[0].frame or 0))
        for n, part in enumerate(parts):
            key = uid if len(parts) == 1 else f"{uid}.{n + 1}"
            series = _make_any(key, part, split=len(parts) > 1)
            if duplicates.get(uid):
                note = (f"{duplicates[uid]} file(s) repeat an instance already read (same SOP "
                        "Instance UID); the first file read was kept")
                series = replace(series, warnings=(*series.warnings, note))
            out.append(series)
    out.sort(key=lambda s: (str(s.header.get("StudyInstanceUID", "")),
                            _series_number(s.header), s.key))
    return out


def _series_number(header: dict[str, Any]) -> int:
    try:
        return int(header.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _position_key(frame: DicomFrame) -> tuple[float, ...]:
    return tuple(round(v, 2) for v in frame.position) if frame.position else (frame.frame or 0,)


#: Keys whose values make separate series (echoes, stacks, image types); time and diffusion
#: keys make volumes of one 4D series instead (:mod:`medvision.io.multivolume`).
_SERIES_KEYS = ("EchoNumbers", "StackID", "ImageType")


def _split_duplicates(frames: list[DicomFrame]) -> list[list[DicomFrame]]:
    """Split frames that share positions by the first key that makes separate series (echo,
    stack, image type); what is left sharing positions is a 4D series."""
    positions = [_position_key(f) for f in frames]
    if len(set(positions)) == len(positions) or frames[0].position is None:
        return [frames]
    names = [name for name, _ in frames[0].split_keys if name in _SERIES_KEYS]
    for name in names:
        parts: dict[str, list[DicomFrame]] = defaultdict(list)
        for frame in frames:
            parts[dict(frame.split_keys).get(name, "")].append(frame)
        if len(parts) > 1 and all(
            len({_position_key(f) for f in p}) == len(p) for p in parts.values()
        ):
            return [parts[k] for k in sorted(parts)]
    return [frames]


def _normal(frame: DicomFrame) -> np.ndarray:
    if frame.normal is not None:
        return np.array(frame.normal, dtype=float)
    orientation = np.array(frame.orientation, dtype=float)
    return np.cross(orientation[:3], orientation[3:])


def _make_any(key: str, frames: list[DicomFrame], *, split: bool) -> DicomSeries:
    """A 3D series, or a 4D one when planes repeat positions (several volumes)."""
    has_geometry = all(f.orientation is not None and f.position is not None for f in frames)
    if not has_geometry or not repeats_positions(frames):
        return _make_series(key, frames, split=split)
    first = frames[0]
    normal = _normal(first)
    where = f"{first.path}: series {key}"
    try:
        separation = separate_volumes(frames, normal, where)
    except SeriesAssemblyError as e:
        return DicomSeries(key=key, frames=tuple(frames), header=_header(first, key),
                           geometry=None, warnings=(), error=str(e))
    base = _make_series(key, list(separation.volumes[0]), split=split)
    if base.error is not None:
        return replace(base, frames=tuple(f for v in separation.volumes for f in v))
    orientation = np.array(first.orientation, dtype=float)
    axes = np.stack([orientation[:3], orientation[3:], normal / np.linalg.norm(normal)])
    gradients = tuple(tuple(round(float(v), 6) for v in axes @ np.array(g))
                      for g in separation.gradients_lps)
    tiles = [f.tile for f in separation.volumes[0] if f.tile is not None]
    sidecar = bids_sidecar(first.dataset, slice_order=tiles if len(tiles) == len(
        separation.volumes[0]) else None)
    fourth = FourthAxis(kind=separation.kind, separated_by=separation.separated_by,
                        times_s=separation.times_s, b_values=separation.b_values,
                        gradients=gradients,  # type: ignore[arg-type]
                        repetition_time_s=sidecar.get("RepetitionTime"), sidecar=sidecar)
    notes = [f"{len(separation.volumes)} volumes of {len(separation.volumes[0])} slices, "
             f"separated by {separation.separated_by}"]
    if separation.dropped:
        notes.append(separation.dropped)
    return replace(base, frames=tuple(f for v in separation.volumes for f in v),
                   fourth_axis=fourth, volume_size=len(separation.volumes[0]),
                   warnings=tuple(w for w in base.warnings if "several stacks" not in w)
                   + tuple(notes[1:]), notes=tuple(notes[:1]))


def _header(first: DicomFrame, key: str) -> dict[str, Any]:
    header = header_summary(first.dataset)
    header["SeriesKey"] = key
    return header


def _make_series(key: str, frames: list[DicomFrame], *, split: bool) -> DicomSeries:
    first = frames[0]
    header = header_summary(first.dataset)
    header["SeriesKey"] = key
    warnings: list[str] = []
    if split:
        warnings.append("one Series Instance UID held several stacks; split by orientation, "
                        "size, echo or time")
    has_geometry = all(f.orientation is not None and f.position is not None for f in frames)
    if len(frames) == 1 or not has_geometry:
        ordered = sorted(frames, key=lambda f: (f.frame or 0, f.tile or 0))
        if len(frames) > 1:
            warnings.append("frames have no positions: stacked in file order; the slice "
                            "spacing comes from SpacingBetweenSlices/SliceThickness or is 1 mm")
        if first.pixel_spacing is None:
            warnings.append("no pixel spacing in the header: 1 mm assumed")
        elif "PixelSpacing" not in first.dataset and "ImagerPixelSpacing" in first.dataset:
            warnings.append("spacing from ImagerPixelSpacing (at the detector, not the patient)")
        return DicomSeries(key=key, frames=tuple(ordered), header=header, geometry=None,
                           warnings=tuple(warnings))
    if first.pixel_spacing is None:
        raise SeriesAssemblyError(f"{first.path}: series {key} has positions but no spacing")
    normal = np.array(first.normal) if first.normal is not None else np.cross(
        first.orientation[:3], first.orientation[3:])  # type: ignore[index]
    ordered = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))  # type: ignore[arg-type]
    try:
        geometry = analyse_slices(
            positions=np.array([f.position for f in ordered], dtype=float),
            orientation=np.array(first.orientation, dtype=float),
            pixel_spacing=first.pixel_spacing,
            matrix=(first.columns, first.rows),
            normal=normal,
            where=f"{first.path}: series {key}",
        )
    except DataError as e:
        return DicomSeries(key=key, frames=tuple(ordered), header=header, geometry=None,
                           warnings=tuple(warnings), error=str(e))
    warnings.extend(geometry.problems)
    if not geometry.regular:
        warnings.append(f"loads resampled onto a regular grid of {geometry.output_shape} voxels, "
                        f"slice spacing {geometry.slice_spacing:.3f} mm")
    return DicomSeries(key=key, frames=tuple(ordered), header=header, geometry=geometry,
                       warnings=tuple(warnings))
