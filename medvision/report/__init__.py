"""Reports: report.json (versioned schema), report.html, PNG figures, batch summaries."""

from medvision.report.json_report import SCHEMA_VERSION, load_schema, validate_report

__all__ = ["SCHEMA_VERSION", "load_schema", "validate_report"]
