"""The pipeline file's reference, generated from the pydantic models so it cannot drift.

:func:`json_schema` is the JSON Schema editors use to validate and complete pipeline files
(``medvision pipelines schema > pipeline.schema.json``; with the YAML language server, put
``# yaml-language-server: $schema=pipeline.schema.json`` at the top of a pipeline file).
:func:`reference_markdown` is ``docs/pipeline-reference.md``: every key with its type,
default, allowed values and meaning; a test fails when the file and the models differ.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel

from medvision.config import LOSSES, Pipeline

__all__ = ["json_schema", "reference_markdown"]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file (draft 2020-12)."""
    schema = Pipeline.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "medvision pipeline file"
    return schema


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if isinstance(annotation, type) and hasattr(annotation, "__members__"):  # enums
        return " \\| ".join(f"`{m.value}`" for m in annotation)  # type: ignore[attr-defined]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type(inner[0])}" if inner else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if hasattr(value, "value"):
        value = value.value
    return f"`{json.dumps(value, default=str)}`"


def _models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for candidate in (field.annotation, *typing.get_args(field.annotation)):
                for inner in (candidate, *typing.get_args(candidate)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        visit(inner)

    visit(Pipeline)
    return seen


def reference_markdown() -> str:
    """``docs/pipeline-reference.md``."""
    lines = ["# Pipeline file reference", "",
             "Generated from `medvision/config.py` by `medvision pipelines schema --markdown`; "
             "`tests/config/test_reference.py` fails when this file and the code differ. "
             "`medvision pipelines schema` prints the JSON Schema for editors.", ""]
    for model in _models():
        title = "Pipeline (top level)" if model is Pipeline else model.__name__
        lines += [f"## {title}", "", (model.__doc__ or "").strip().split("\n\n")[0].replace(
            "\n", " "), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | "
                         f"{meaning} |")
        lines.append("")
    lines += ["## Losses and the tasks they fit", "", "| loss | tasks | options honoured |",
              "|---|---|---|"]
    for name, (tasks, options) in LOSSES.items():
        lines.append(f"| `{name}` | {', '.join(sorted(tasks))} | "
                     f"{', '.join(sorted(options))} |")
    lines += ["", "Networks (`model.name`) and their parameters: `medvision/models/registry.py`"
              " (MONAI constructors; `model.params` are their keyword arguments) and "
              "`medvision/models/detection.py` (`retinanet`).", ""]
    return "\n".join(lines)
