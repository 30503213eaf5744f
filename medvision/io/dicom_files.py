"""Finding DICOM files and describing every 2D frame they hold, from headers only.

A *frame* is one 2D image with its own geometry: a single-frame instance, one frame of a
multi-frame (enhanced) instance, or one tile of a Siemens mosaic. Series assembly
(:mod:`medvision.io.dicom_series`) works on frames, so every kind of file is grouped, sorted and
checked by one mechanism.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import InputNotFoundError, InvalidDicomError, UnsupportedFormatError
from medvision.io.boundary import check_voxel_budget, reading

__all__ = [
    "DicomFrame",
    "frames_of",
    "header_summary",
    "iter_candidate_files",
    "read_header",
]

log = logging.getLogger(__name__)

#: Technical attributes copied into ``Volume.header``; nothing here identifies a patient.
SUMMARY_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "MagneticFieldStrength",
    "PatientPosition",
    "PatientOrientation",
    "ViewPosition",
    "GantryDetectorTilt",
)

#: The most frames one instance may hold (each frame becomes an object before any pixel is read).
MAX_FRAMES = 100_000

@dataclass(frozen=True)
class DicomFrame:
    """One 2D image inside a DICOM file, described by its header.

    Attributes:
        path: the file.
        dataset: the parsed header (large values such as pixel data are read on demand).
        frame: index into a multi-frame instance's frames, or ``None`` for a single frame.
        tile: index of the tile inside a Siemens mosaic, or ``None``.
        sop_instance_uid: the instance's SOP Instance UID.
        rows: image height in pixels.
        columns: image width in pixels.
        orientation: DICOM Image Orientation (Patient): row then column direction cosines
            (LPS), or ``None`` when the file has none.
        position: DICOM Image Position (Patient) of the first pixel's centre (LPS mm), or
            ``None``.
        pixel_spacing: (between rows, between columns) in mm, or ``None``.
        slice_thickness: mm, or ``None``.
        rescale: per-frame (slope, intercept) from an enhanced object's functional groups, or
            ``None`` to apply the instance's modality LUT.
        normal: slice normal (LPS) when the file states it (mosaic), else ``None``.
        split_keys: values that may separate frames sharing a position (echo, time, stack).
    """

    path: str
    dataset: Any
    frame: int | None
    tile: int | None
    sop_instance_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale: tuple[float, float] | None
    normal: tuple[float, float, float] | None
    split_keys: tuple[tuple[str, str], ...]

    @property
    def key(self) -> tuple[str, int, int]:
        """Identity of this frame for de-duplication: instance UID, frame and tile."""
        return (self.sop_instance_uid, -1 if self.frame is None else self.frame,
                -1 if self.tile is None else self.tile)


def iter_candidate_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Yield files under ``paths`` (files as given, folders walked recursively, sorted).

    Hidden files and folders (names starting with ``.``) are skipped; every other file is
    yielded, so a file that is not an image is reported rather than silently ignored.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    yield Path(root) / name
        elif path.exists():
            yield path
        else:
            raise InputNotFoundError(f"{path}: no such file or folder")


def read_header(path: Path) -> Any:
    """Parse a DICOM file's header, deferring large values (pixel data) until used.

    Raises:
        InvalidDicomError: the file is not DICOM or is unreadable; the message names the file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError as PydicomInvalid

    with reading(path, "DICOM header", InvalidDicomError):
        try:
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except PydicomInvalid:
            # No preamble/'DICM' marker: accept only if it parses as a dataset starting with
            # a plausible group (some old files are bare datasets).
            try:
                ds = pydicom.dcmread(path, defer_size="64 KB", force=True)
            except Exception as e:  # noqa: BLE001 - any parse failure means "not DICOM"
                raise InvalidDicomError(f"{path}: not a DICOM file ({e})") from e
            if "SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds:
                raise InvalidDicomError(
                    f"{path}: not a DICOM file (no DICM marker and no DICOM image attributes)"
                ) from None
        # pydicom converts values lazily, so a malformed element (bad VR, wrong length)
        # raises on first use: the attributes assembly needs are read inside the scan's
        # guard (frames_of, series keys), and header_summary skips a malformed one.
        return _with_transfer_syntax(ds)


def _with_transfer_syntax(ds: Any) -> Any:
    """Fill in a missing Transfer Syntax UID from the encoding the file was actually read in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = ds.original_encoding
    if implicit is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                              else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def dicomdir_files(ds: Any, path: Path) -> list[Path]:
    """The files a DICOMDIR references, resolved relative to its folder."""
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(ds)
        files = [Path(inst.path) for inst in fileset]
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad DICOMDIRs
        raise InvalidDicomError(f"{path}: cannot read the DICOMDIR's records ({e})") from e
    if not files:
        raise UnsupportedFormatError(f"{path}: the DICOMDIR references no image files")
    return files


def header_summary(ds: Any) -> dict[str, Any]:
    """An allowlisted, JSON-friendly summary of a dataset's technical attributes."""
    out: dict[str, Any] = {}
    for keyword in SUMMARY_KEYWORDS:
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            out[keyword] = _plain(value)
        except Exception as e:  # noqa: BLE001 - a malformed optional value is left out
            log.debug("header value %s unreadable: %s", keyword, e)
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid is not None:
        out["TransferSyntaxUID"] = str(tsuid)
        out["TransferSyntax"] = getattr(tsuid, "name", str(tsuid))
    return out


def _plain(value: Any) -> Any:
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str):
        return value if not isinstance(value, str) else str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _item(seq: Any) -> Any:
    return seq[0] if seq is not None and len(seq) > 0 else None


def _functional_group(ds: Any, frame: int, name: str) -> Any:
    """The first item of ``name`` for ``frame`` (per-frame group first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        item = _item(per_frame[frame].get(name))
        if item is not None:
            return item
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))
    return _item(shared.get(name)) if shared is not None else None


def _spacing(ds: Any) -> tuple[float, float] | None:
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if spacing is None:
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    if spacing is not None and min(spacing) <= 0:
        return None
    return spacing  # type: ignore[return-value]


def _thickness(ds: Any) -> float | None:
    try:
        value = float(ds.get("SliceThickness"))
    except (TypeError, ValueError):
        return None
    return value if value > 0 and math.isfinite(value) else None


def _split_keys(ds: Any, fg: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    keys: list[tuple[str, str]] = []
    for keyword in ("EchoNumbers", "TemporalPositionIdentifier", "AcquisitionNumber"):
        if ds.get(keyword) is not None:
            keys.append((keyword, str(ds.get(keyword))))
    content = fg.get("FrameContentSequence")
    if content is not None:
        for keyword in ("StackID", "TemporalPositionIndex"):
            if content.get(keyword) is not None:
                keys.append((keyword, str(content.get(keyword))))
    image_type = ds.get("ImageType")
    if image_type is not None:
        keys.append(("ImageType", "\\".join(str(v) for v in image_type)))
    return tuple(keys)


def _mosaic_count(ds: Any) -> int:
    """Number of slices in a Siemens mosaic, or 0 when the image is not one."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return 0
    element = ds.get((0x0019, 0x100A))  # NumberOfImagesInMosaic (SIEMENS MR HEADER)
    try:
        count = int(element.value) if element is not None else 0
    except (TypeError, ValueError):
        count = 0
    if count <= 0:
        csa = _csa_image_header(ds)
        count = int(csa.get("NumberOfImagesInMosaic", 0)) if csa else 0
    return count


def _csa_image_header(ds: Any) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings():  # nibabel warns that nicom is experimental, on import
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception as e:  # noqa: BLE001 - malformed private data must not stop a read
        log.debug("unreadable Siemens CSA header: %s", e)
        return {}
    if not header:
        return {}
    out: dict[str, Any] = {}
    for name in ("NumberOfImagesInMosaic", "SliceNormalVector"):
        try:
            value = csareader.get_scalar(header, name) if name.startswith("Number") \
                else csareader.get_vector(header, name, 3)
        except Exception:  # noqa: BLE001
            value = None
        if value is not None:
            out[name] = value
    return out


def frames_of(ds: Any, path: Path) -> list[DicomFrame]:
    """Every 2D frame in a parsed DICOM instance.

    Raises:
        UnsupportedFormatError: the instance holds no image (SR, RT structure set, DICOMDIR...).
        InvalidDicomError: image attributes are missing or inconsistent.
    """
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        what = getattr(sop, "name", None) or "object"
        if "Image Storage" in what and "Rows" in ds:
            raise InvalidDicomError(
                f"{path}: an image ({what}) whose file ends after "
                f"{os.path.getsize(path):,} bytes without pixel data; it is probably truncated")
        raise UnsupportedFormatError(f"{path}: holds no pixel data ({what})")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidDicomError(f"{path}: pixel data without valid Rows/Columns") from e
    if rows <= 0 or columns <= 0:
        raise InvalidDicomError(f"{path}: empty image ({rows}x{columns})")
    sop_uid = str(ds.get("SOPInstanceUID") or path)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if not 0 < n_frames <= MAX_FRAMES:
        raise InvalidDicomError(f"{path}: Number of Frames is {n_frames} (medvision reads "
                                f"1 to {MAX_FRAMES:,} frames per instance)")
    _check_pixel_data(ds, path, rows, columns, n_frames)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    position = _floats(ds.get("ImagePositionPatient"), 3)
    base = {
        "path": str(path),
        "dataset": ds,
        "sop_instance_uid": sop_uid,
        "pixel_spacing": _spacing(ds),
        "slice_thickness": _thickness(ds),
    }

    mosaic = _mosaic_count(ds) if n_frames == 1 else 0
    if mosaic > 1:
        return _mosaic_frames(ds, base, rows, columns, mosaic, orientation, position)

    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [DicomFrame(frame=None, tile=None, rows=rows, columns=columns,
                           orientation=orientation, position=position,  # type: ignore[arg-type]
                           rescale=None, normal=None, split_keys=_split_keys(ds, {}), **base)]

    offsets = _grid_offsets(ds, n_frames, orientation, position)
    dose_scale = ds.get("DoseGridScaling")
    frames = []
    for f in range(n_frames):
        fg = {name: _functional_group(ds, f, name) for name in (
            "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
            "PixelValueTransformationSequence", "FrameContentSequence")}
        f_pos = position
        f_ori = orientation
        spacing, thickness = base["pixel_spacing"], base["slice_thickness"]
        if fg["PlanePositionSequence"] is not None:
            f_pos = _floats(fg["PlanePositionSequence"].get("ImagePositionPatient"), 3)
        if fg["PlaneOrientationSequence"] is not None:
            f_ori = _floats(fg["PlaneOrientationSequence"].get("ImageOrientationPatient"), 6)
        if fg["PixelMeasuresSequence"] is not None:
            spacing = _spacing(fg["PixelMeasuresSequence"]) or spacing
            thickness = _thickness(fg["PixelMeasuresSequence"]) or thickness
        if offsets is not None:
            f_pos = offsets[f]
        rescale = (float(dose_scale), 0.0) if dose_scale is not None else None
        pvt = fg["PixelValueTransformationSequence"]
        if pvt is not None and "RescaleSlope" in pvt:
            rescale = (float(pvt.RescaleSlope), float(pvt.get("RescaleIntercept", 0.0)))
        frames.append(DicomFrame(
            path=base["path"], dataset=ds, frame=f, tile=None, sop_instance_uid=sop_uid,
            rows=rows, columns=columns, orientation=f_ori, position=f_pos,  # type: ignore[arg-type]
            pixel_spacing=spacing, slice_thickness=thickness, rescale=rescale, normal=None,
            split_keys=_split_keys(ds, fg),
        ))
    return frames


def _check_pixel_data(ds: Any, path: Path, rows: int, columns: int, n_frames: int) -> None:
    """Refuse, from the header alone, pixel data too large to hold or shorter than declared.

    Raises:
        InvalidDicomError: more values than :data:`~medvision.io.boundary.MAX_VOXELS`, a
            value that runs past the end of the file, or uncompressed data shorter than
            rows x columns x frames x samples needs (never zero-padded).
    """
    samples = int(ds.get("SamplesPerPixel") or 1)
    check_voxel_budget(path, (n_frames, rows, columns, samples), InvalidDicomError)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)  # Pixel Data
    if raw is None:
        return  # float or double float pixel data: checked by the decoder
    length = int(raw.length)
    if length == 0xFFFFFFFF:
        return  # encapsulated (compressed) frames: the codec checks them
    tell = getattr(raw, "value_tell", None)
    if raw.value is None and tell is not None:
        size = os.path.getsize(path)
        if tell + length > size:
            raise InvalidDicomError(
                f"{path}: pixel data declares {length:,} bytes but the file ends "
                f"{tell + length - size:,} bytes short; the file is truncated")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return
    from pydicom.pixels.utils import get_expected_length

    expected = int(get_expected_length(ds, unit="bytes"))
    if length < expected:
        raise InvalidDicomError(
            f"{path}: pixel data holds {length:,} bytes but {n_frames} frame(s) of "
            f"{rows}x{columns}x{samples} need {expected:,}; the file is truncated or its "
            "header is wrong")


def _grid_offsets(ds: Any, n_frames: int, orientation: tuple[float, ...] | None,
                  position: tuple[float, ...] | None) -> list[tuple[float, float, float]] | None:
    """Frame positions of an RT Dose grid from its Grid Frame Offset Vector (mm along n)."""
    offsets = _floats(ds.get("GridFrameOffsetVector"), n_frames)
    if offsets is None or orientation is None or position is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    out = []
    for offset in offsets:
        pos = np.array(position) + normal * (offset - offsets[0])
        out.append((float(pos[0]), float(pos[1]), float(pos[2])))
    return out


def _mosaic_frames(ds: Any, base: dict[str, Any], rows: int, columns: int, count: int,
                   orientation: tuple[float, ...] | None,
                   position: tuple[float, ...] | None) -> list[DicomFrame]:
    """Tiles of a Siemens mosaic as frames with their own positions."""
    path = base["path"]
    grid = math.ceil(math.sqrt(count))
    if rows % grid or columns % grid:
        raise InvalidDicomError(
            f"{path}: mosaic of {count} images does not tile a {rows}x{columns} matrix"
        )
    tile_rows, tile_cols = rows // grid, columns // grid
    spacing = base["pixel_spacing"]
    if orientation is None or position is None or spacing is None:
        raise InvalidDicomError(f"{path}: mosaic without orientation, position or spacing")
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    csa = _csa_image_header(ds)
    normal = np.asarray(csa.get("SliceNormalVector", np.cross(r, c)), dtype=float)
    normal /= np.linalg.norm(normal)
    try:
        step = float(ds.get("SpacingBetweenSlices") or base["slice_thickness"] or 0)
    except (TypeError, ValueError):
        step = 0.0
    if step <= 0:
        raise InvalidDicomError(f"{path}: mosaic without slice spacing or thickness")
    # The header's position is the mosaic's corner; move it to the first tile's corner.
    first = (np.array(position) + r * spacing[1] * (columns - tile_cols) / 2
             + c * spacing[0] * (rows - tile_rows) / 2)
    frames = []
    for k in range(count):
        pos = first + normal * step * k
        frames.append(DicomFrame(
            frame=None, tile=k, rows=tile_rows, columns=tile_cols, orientation=orientation,
            position=(float(pos[0]), float(pos[1]), float(pos[2])), rescale=None,
            normal=(float(normal[0]), float(normal[1]), float(normal[2])),
            split_keys=_split_keys(ds, {}), **base,
        ))
    return frames
