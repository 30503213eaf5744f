"""``medvision pipelines list|show``: the pipelines this installation can run."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``pipelines`` with ``list``, ``show`` and ``schema``."""
    parser = subparsers.add_parser(
        "pipelines", help="list the installed pipelines, or show one's model card",
        description="Pipelines come from --pipelines-dir / $MEDVISION_PIPELINES folders first, "
                    "then from installed packages (the 'medvision.pipelines' entry points; "
                    "medvision's own are one of them).")
    actions = parser.add_subparsers(dest="pipelines_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="name, version, task, source, summary",
                                 epilog="example:\n  medvision pipelines list --json",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    listing.add_argument("--json", action="store_true", help="JSON on stdout")
    listing.set_defaults(run=run)
    show = actions.add_parser("show", help="print a pipeline's model card",
                              epilog="example:\n  medvision pipelines show chest-xray-pneumonia",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("name", help="pipeline name")
    show.set_defaults(run=run)
    schema = actions.add_parser(
        "schema", help="the pipeline file's JSON Schema (for editors), or its reference",
        epilog="examples:\n  medvision pipelines schema > pipeline.schema.json\n"
               "  medvision pipelines schema --markdown > docs/pipeline-reference.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    schema.add_argument("--markdown", action="store_true",
                        help="the human reference (every key, type, default, meaning)")
    schema.set_defaults(run=run)


def _summary(card: str) -> str:
    """The first paragraph of a model card after its title."""
    paragraph: list[str] = []
    for line in card.splitlines():
        if line.startswith("#"):
            if paragraph:
                break
            continue
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    return " ".join(paragraph)


def run(args: argparse.Namespace) -> int:
    """List or show."""
    from medvision.catalog import find_pipelines
    from medvision.config import load_pipeline
    from medvision.errors import ConfigError

    if args.pipelines_action == "schema":
        from medvision.config_reference import json_schema, reference_markdown

        print(reference_markdown() if args.markdown else json.dumps(json_schema(), indent=2))
        return 0
    found = find_pipelines(args.pipelines_dir)
    if args.pipelines_action == "show":
        if args.name not in found:
            raise ConfigError(f"no pipeline '{args.name}' (installed: "
                              f"{', '.join(sorted(found)) or 'none'})")
        card = found[args.name].folder / "MODEL_CARD.md"
        print(card.read_text() if card.is_file() else f"{args.name}: no MODEL_CARD.md")
        return 0
    rows = []
    for name, entry in sorted(found.items()):
        pipeline = load_pipeline(entry.folder)
        card = entry.folder / "MODEL_CARD.md"
        rows.append({"name": name, "version": pipeline.version, "task": pipeline.task,
                     "spatial_dims": pipeline.spatial_dims, "classes": list(pipeline.classes),
                     "source": entry.source, "folder": str(entry.folder),
                     "weights": (entry.folder / "model.safetensors").is_file(),
                     "summary": _summary(card.read_text()) if card.is_file()
                     else pipeline.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        weights = "" if row["weights"] else " (no weights)"
        print(f"{row['name']} {row['version']}: {row['task']}, {row['spatial_dims']}D"
              f"{weights}; from {row['source']}")
        if row["summary"]:
            print(textwrap.fill(_first_sentence(str(row["summary"])), width=96,
                                initial_indent="    ", subsequent_indent="    "))
    return 0


def _first_sentence(text: str, limit: int = 300) -> str:
    """The summary's first sentence (whole words, never cut mid-word), at most ``limit``
    characters; the rest is in ``pipelines show NAME``."""
    import re

    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    if len(sentence) <= limit:
        return sentence
    return textwrap.shorten(sentence, width=limit, placeholder=" ...")
