"""The per-study ``report.json``: building it and validating it against its JSON Schema.

The schema lives in ``medvision/report/report.schema.json`` (documented in
``docs/report.md``). ``schema_version`` follows semantic versioning: a new optional field is a
minor bump, anything that can break a reader is a major one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from medvision.errors import ReportError

__all__ = ["SCHEMA_VERSION", "load_schema", "validate_report"]

SCHEMA_VERSION = "1.1.0"


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The report JSON Schema (draft 2020-12)."""
    text = resources.files("medvision.report").joinpath("report.schema.json").read_text()
    return dict(json.loads(text))


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`ReportError` naming the first problem if ``report`` breaks the schema."""
    import jsonschema

    try:
        jsonschema.validate(report, load_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ReportError(f"report does not match schema {SCHEMA_VERSION} at {where}: "
                          f"{e.message}") from e
