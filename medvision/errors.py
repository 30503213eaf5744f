"""The whole medvision error hierarchy.

Every error the library raises on purpose derives from :class:`MedvisionError`, so a caller can
catch "any medvision error" in one place. Messages say what was expected, what was found, how to
fix it, and name the file concerned. They never carry patient identity.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataLayoutError",
    "DeliveryError",
    "DeviceError",
    "ExplainError",
    "GeometryError",
    "InputNotFoundError",
    "InvalidDicomError",
    "MedvisionError",
    "MissingDependencyError",
    "ModelError",
    "PacsError",
    "ReportError",
    "SeriesAssemblyError",
    "UnknownStudyError",
    "UnreadableFileError",
    "UnsupportedFormatError",
]


class MedvisionError(Exception):
    """Root of every error medvision raises on purpose."""


class ConfigError(MedvisionError):
    """A pipeline or settings file is missing, malformed or inconsistent."""


class DeviceError(ConfigError):
    """A device was asked for that this machine does not have, or a precision it cannot run
    (a usage error: exit 2)."""


class DataError(MedvisionError):
    """An input file or folder cannot be turned into a valid image."""


class UnsupportedFormatError(DataError):
    """The file is not in a format medvision reads (or holds no image)."""


class InputNotFoundError(UnsupportedFormatError, ConfigError):
    """A path named on the command line does not exist (a usage error: exit 2)."""


class DataLayoutError(DataError, ConfigError):
    """The data named for training, evaluation or planning is absent or not laid out as the
    pipeline says (class folders, images/ + labels/, VOC...): a usage error, exit 2."""


class UnreadableFileError(DataError):
    """A file of a format we read (NIfTI, PNG, NRRD ...) is truncated, corrupt or unreadable."""


class InvalidDicomError(DataError):
    """A DICOM file is unreadable, truncated or violates the standard in a way we cannot repair."""


class SeriesAssemblyError(DataError):
    """DICOM instances cannot be assembled into one consistent series."""


class GeometryError(DataError):
    """The image geometry is missing, degenerate or cannot be represented correctly."""


class ModelError(MedvisionError):
    """A model cannot be built, loaded or run."""


class CheckpointError(ModelError):
    """A checkpoint or weights file is missing, corrupt or does not match the model."""


class ExplainError(MedvisionError):
    """An attribution (saliency) method failed or was misconfigured."""


class ReportError(MedvisionError):
    """A report or DICOM result object cannot be written."""


class PacsError(MedvisionError):
    """A DICOM network operation failed."""


class DeliveryError(PacsError):
    """A result could not be delivered to a DICOM peer.

    Attributes:
        permanent: retrying cannot help until something changes at the peer (for example it
            does not accept the object's SOP class); the item fails at once.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class UnknownStudyError(PacsError, ConfigError):
    """A study key that the bridge's work folder does not hold (a usage error: exit 2)."""


class AuditError(MedvisionError):
    """The audit log cannot be written or fails verification."""


class MissingDependencyError(MedvisionError, ImportError):
    """An optional dependency needed for this operation is not installed."""
