"""Closed vocabularies shared by configuration, library and command line.

Kept in a module with no imports of the package, so the command line can offer them as
choices without loading the stages that implement them. Each is a ``StrEnum``: members
compare equal to their string values, which is what files and JSON hold.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EXPLANATION_METHODS", "STUDY_STATUSES", "ExplanationMethod", "Severity", "Status",
           "Task"]


class Task(StrEnum):
    """What a pipeline's model does."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"
    DETECTION = "detection"


class Status(StrEnum):
    """What a study's report says about it (``report.json`` ``status``)."""

    OK = "ok"
    FLAGGED = "flagged"
    REJECTED = "rejected"
    FAILED = "failed"


class Severity(StrEnum):
    """A QC flag's weight: ``reject`` stops the study, ``warn`` is reported."""

    WARN = "warn"
    REJECT = "reject"


class ExplanationMethod(StrEnum):
    """Captum attribution methods a pipeline or ``analyze --explain`` can name."""

    GRADCAM = "gradcam"
    LAYERCAM = "layercam"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    SALIENCY = "saliency"
    OCCLUSION = "occlusion"


#: The values, for argparse ``choices``.
EXPLANATION_METHODS = tuple(m.value for m in ExplanationMethod)
STUDY_STATUSES = tuple(s.value for s in Status)
