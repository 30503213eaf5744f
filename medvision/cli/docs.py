"""``medvision docs [NAME]``: the documentation that came with this installation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medvision.cli.conventions import examples

__all__ = ["add_parser", "docs_folder", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``docs``."""
    parser = subparsers.add_parser(
        "docs", help="list or print the documentation installed with medvision",
        description="Without a name: every document with its path (open them in a Markdown "
                    "viewer or an editor). With a name (training, report, pacs...): print "
                    "that document. The README is 'readme' in a source checkout.")
    parser.add_argument("name", nargs="?", help="a document's name, e.g. training")
    parser.add_argument("--path", action="store_true", help="print the document's path only")
    examples(parser, "medvision docs", "medvision docs training | less",
             "medvision docs report --path")
    parser.set_defaults(run=run)


def docs_folder() -> Path | None:
    """Where the documentation is: the installed ``medvision_docs`` package, else the
    checkout's ``docs/`` beside the package (an editable install)."""
    import importlib.util

    spec = importlib.util.find_spec("medvision_docs")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if any(folder.glob("*.md")):
            return folder
    checkout = Path(__file__).resolve().parents[2] / "docs"
    return checkout if checkout.is_dir() else None


def run(args: argparse.Namespace) -> int:
    """List the documents or print one."""
    from medvision.errors import ConfigError

    folder = docs_folder()
    if folder is None:
        raise ConfigError("this installation has no documentation (medvision_docs); see the "
                          "project's docs/ folder")
    documents = {p.stem.lower(): p for p in sorted(folder.glob("*.md"))}
    readme = folder.parent / "README.md"
    if readme.is_file():
        documents.setdefault("readme", readme)
    if not args.name:
        for name, path in documents.items():
            title = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                          if line.startswith("#")), "")
            print(f"{name:<20} {title}\n{'':<20} {path}")
        return 0
    wanted = args.name.lower().removesuffix(".md")
    if wanted not in documents:
        raise ConfigError(f"no document '{args.name}' (there are: {', '.join(documents)})")
    print(documents[wanted] if args.path else documents[wanted].read_text(), end="\n"
          if args.path else "")
    return 0
