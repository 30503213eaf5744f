"""Reading and writing images: DICOM series, NIfTI, NRRD/MHA, PNG/JPEG. Does not import torch."""

from medvision.io.dicom_series import DicomScan, DicomSeries, scan_dicom
from medvision.io.registry import (
    Inventory,
    SourceEntry,
    detect_format,
    inventory,
    read_volume,
    write_volume,
)
from medvision.io.volume import LPS_TO_RAS, Volume, orientation_code

__all__ = [
    "LPS_TO_RAS",
    "DicomScan",
    "DicomSeries",
    "Inventory",
    "SourceEntry",
    "Volume",
    "detect_format",
    "inventory",
    "orientation_code",
    "read_volume",
    "scan_dicom",
    "write_volume",
]
