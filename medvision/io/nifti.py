"""NIfTI reading and writing through nibabel, and other volume formats through SimpleITK."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import DataError, GeometryError, UnreadableFileError, UnsupportedFormatError
from medvision.io.boundary import check_voxel_budget, reading
from medvision.io.synthetic import synthetic_provenance
from medvision.io.volume import LPS_TO_RAS, FourthAxis, Volume

__all__ = ["read_itk", "read_nifti", "write_nifti"]

#: NIfTI-1 extension code of a free-text comment (where a synthetic volume's provenance goes).
_COMMENT = 6


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI-1/2 (or Analyze) file; nibabel picks the sform, else the qform.

    A 3D file gives ``(1, I, J, K)``; a 4D file's fourth axis (time or components) becomes the
    channel axis; a 5D vector file ``(I, J, K, 1, C)`` gives ``(C, I, J, K)``.
    """
    import nibabel as nib

    image: Any
    with reading(path, "NIfTI", UnreadableFileError):
        image = nib.load(str(path))
        check_voxel_budget(path, tuple(int(n) for n in image.shape), UnreadableFileError)
        data = np.asarray(image.dataobj, dtype=np.float32)
        comments = [e.get_content() for e in getattr(image.header, "extensions", ())
                    if e.get_code() == _COMMENT]
        if image.header.get_slope_inter() != (None, None) and not np.all(np.isfinite(data)):
            raise DataError(f"{path}: scaled voxels are not finite")
    fourth = None
    if data.ndim == 4 and data.shape[3] > 1:
        fourth = _fourth_axis(path, image)
    if data.ndim == 2:
        data = data[..., np.newaxis]
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        data = data[np.newaxis]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    else:
        raise UnsupportedFormatError(f"{path}: NIfTI with {data.ndim} dimensions is not supported")
    affine = np.asarray(image.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryError(f"{path}: the NIfTI affine (sform/qform) is singular")
    header = {"format": "NIfTI", "sform_code": int(image.header.get("sform_code", 0)),
              "qform_code": int(image.header.get("qform_code", 0))}
    synthetic = synthetic_provenance(path, comments)
    if synthetic is not None:
        header["synthetic"] = synthetic
    modality = "OT"
    descrip = _description(image)
    if descrip.startswith("medvision:"):
        modality = descrip.split(":", 2)[1] or "OT"
    return Volume(array=data, affine=affine, modality=modality, header=header, source=str(path),
                  fourth_axis=fourth)


def _fourth_axis(path: Path, image: Any) -> FourthAxis:
    """A 4D file's fourth axis: time with its step (pixdim[4] in the file's time unit), and
    the diffusion table when FSL ``.bval``/``.bvec`` files lie beside it."""
    from medvision.io.bids import read_fsl_table

    _, unit = image.header.get_xyzt_units()
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(str(unit))
    step = float(image.header.get_zooms()[3]) if len(image.header.get_zooms()) > 3 else 0.0
    tr = round(step * scale, 6) if scale is not None and step > 0 else None
    table = read_fsl_table(path, np.asarray(image.affine), count=int(image.shape[3]))
    if table is not None:
        return FourthAxis(kind="diffusion", separated_by="NIfTI 4th axis (.bval/.bvec)",
                          b_values=table[0], gradients=table[1], repetition_time_s=tr)
    return FourthAxis(kind="time", separated_by="NIfTI 4th axis", repetition_time_s=tr,
                      times_s=tuple(round(t * tr, 6) for t in range(int(image.shape[3])))
                      if tr else ())


def _description(image: object) -> str:
    try:
        raw = image.header["descrip"]  # type: ignore[attr-defined]
        return bytes(raw.item()).decode("ascii", errors="ignore").strip("\x00 ")
    except (KeyError, AttributeError, TypeError, ValueError):
        return ""


def write_nifti(volume: Volume, path: str | os.PathLike[str], *, comment: str | None = None
                ) -> Path:
    """Write ``volume`` as NIfTI-1 with sform and qform set to its affine (scanner space);
    ``comment`` goes into a comment extension (code 6).

    Integer-valued data that fits int16 is stored as int16 (lossless, half the size); anything
    else as float32. A 2D image is written as one slice; several channels go on the 4th axis.
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(volume.array)
    if volume.spatial_dims == 2:
        array = array[..., np.newaxis]
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    if np.all(np.isfinite(data)) and np.array_equal(data, np.round(data)) and (
        data.size == 0 or (data.min() >= -32768 and data.max() <= 32767)
    ):
        data = data.astype(np.int16)
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(volume.affine))
    image.header.set_xyzt_units("mm", "sec")
    fourth = volume.fourth_axis
    if fourth is not None and data.ndim == 4:
        zooms = list(image.header.get_zooms()[:3])
        image.header.set_zooms((*zooms, float(fourth.repetition_time_s or 1.0)))
    image.set_sform(np.asarray(volume.affine), code=1)
    image.set_qform(np.asarray(volume.affine), code=1)
    image.header["descrip"] = f"medvision:{volume.modality}"[:79].encode()
    if comment is not None:
        image.header.extensions.append(nib.nifti1.Nifti1Extension(_COMMENT, comment.encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def read_itk(path: Path) -> Volume:
    """Read NRRD, MetaImage (MHA/MHD) and other SimpleITK formats into RAS+ geometry."""
    from medvision.extras import require

    require("SimpleITK", "itk", f"reading {path.suffix or 'this format'} files")
    import SimpleITK as sitk

    with reading(path, "image (SimpleITK)", UnreadableFileError):
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        check_voxel_budget(path, (*info.GetSize(), info.GetNumberOfComponents()),
                           UnreadableFileError)
        image = sitk.ReadImage(str(path))
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise UnsupportedFormatError(f"{path}: {dim}D images are not supported")
    with reading(path, "image (SimpleITK)", UnreadableFileError):
        data = sitk.GetArrayFromImage(image).astype(np.float32)  # (K,) J, I [, C]
    if image.GetNumberOfComponentsPerPixel() == 1:
        data = data[..., np.newaxis]
    data = np.moveaxis(data, -1, 0)  # C, (K,) J, I
    data = np.transpose(data, (0, *range(data.ndim - 1, 0, -1)))  # C, I, J, (K)
    direction = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)
    spacing = np.array(image.GetSpacing(), dtype=float)
    origin = np.array(image.GetOrigin(), dtype=float)
    affine = np.eye(4)
    affine[:dim, :dim] = direction * spacing
    affine[:dim, 3] = origin
    if dim == 2:
        data = data[..., np.newaxis]
    return Volume(array=data, affine=LPS_TO_RAS @ affine, header={"format": "ITK"},
                  source=str(path))
