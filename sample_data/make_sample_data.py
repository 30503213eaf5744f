"""Write the synthetic sample data shipped in this folder (deterministic: same bytes each run).

Run from the repository root::

    .venv/bin/python sample_data/make_sample_data.py

It writes:

* ``ct_phantom/IM0001.dcm`` ... a CT-like DICOM series, 30 axial slices of 80x80 at
  3 x 3 x 5 mm: an elliptical head with a skull ring and a 12 mm hyperdense (70 HU) lesion in
  the right hemisphere. Stored values are int16 with Rescale Intercept -1024. Patient name,
  ID and birth date are made up (``DEMO^PHANTOM``, ``MV-DEMO-0001``, ``19700101``) so that the
  privacy tests can check they never leak.
* ``mr_phantom.nii.gz``: a 48x56x40 MR-like volume at 1 mm (RAS+) with a bright lesion.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

HERE = Path(__file__).resolve().parent
SEED = 20261129


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["medvision-sample", *map(str, parts)])


def ct_phantom() -> np.ndarray:
    """HU volume (x, y, z) = (80, 80, 30): head, skull, lesion."""
    rng = np.random.default_rng(SEED)
    x, y, z = np.meshgrid(np.arange(80), np.arange(80), np.arange(30), indexing="ij")
    cx, cy = 39.5, 39.5
    r = ((x - cx) / 30) ** 2 + ((y - cy) / 36) ** 2 + ((z - 15) / 18) ** 2
    hu = np.full(x.shape, -1000.0)
    hu[r < 1.0] = 1000.0  # skull
    hu[r < 0.85] = 35.0  # brain
    lesion = ((x - 25) * 3) ** 2 + ((y - 35) * 3) ** 2 + ((z - 16) * 5) ** 2 < 12**2
    hu[lesion] = 70.0
    hu += rng.normal(0, 4, hu.shape) * (r < 1.0)
    return np.round(hu)


def write_ct(folder: Path) -> None:
    """Write the CT phantom as a DICOM series (one file per slice, LPS geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = ct_phantom()
    study, series, frame = _uid("study"), _uid("series"), _uid("frame")
    spacing, thickness = 3.0, 5.0
    for k in range(hu.shape[2]):
        sop = _uid("instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer = "CT", "medvision sample data"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DEMO^PHANTOM", "MV-DEMO-0001", "19700101"
        ds.PatientSex, ds.StudyDate, ds.StudyTime = "O", "20260101", "120000"
        ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "MVDEMO1", "1", 2, k + 1
        ds.SeriesDescription, ds.BodyPartExamined = "HEAD PHANTOM 5mm", "HEAD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-118.5, -118.5, -75.0 + k * thickness]
        ds.SliceLocation = -75.0 + k * thickness
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.KVP = 120
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        stored = (hu[:, :, k].T + 1024).astype(np.int16)  # DICOM rows are y, columns x
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


def write_mr(path: Path) -> None:
    """Write a small MR-like NIfTI volume with a bright lesion."""
    rng = np.random.default_rng(SEED + 1)
    shape = (48, 56, 40)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    r = ((x - 23.5) / 20) ** 2 + ((y - 27.5) / 24) ** 2 + ((z - 19.5) / 17) ** 2
    data = np.where(r < 1, 400.0, 0.0) + rng.normal(0, 10, shape) * (r < 1)
    data[((x - 30) ** 2 + (y - 20) ** 2 + (z - 22) ** 2) < 16] = 900.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-23.5, -27.5, -19.5]
    image = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))


def main() -> int:
    """Write everything; returns 0."""
    write_ct(HERE / "ct_phantom")
    write_mr(HERE / "mr_phantom.nii.gz")
    print(f"wrote sample data under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
