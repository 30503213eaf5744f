"""Reports: the typed :class:`StudyReport` and its renderers (JSON, HTML, figures, DICOM)."""

from medvision.report.json import SCHEMA_VERSION, load_schema, to_document, validate_report

__all__ = ["SCHEMA_VERSION", "load_schema", "to_document", "validate_report"]
