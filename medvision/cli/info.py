"""``medvision info PATH...``: what images a set of files and folders holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``info``."""
    parser = subparsers.add_parser(
        "info", help="list the series and images found under paths",
        description="List every DICOM series (and NIfTI/NRRD/PNG/JPEG file) found under the "
                    "paths, with modality, matrix, spacing, orientation, slice count, transfer "
                    "syntax and warnings. Reads headers only.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or DICOMDIRs")
    parser.add_argument("--json", action="store_true", help="print JSON with a 'series' list")
    examples(parser, 'medvision info scans/', 'medvision info scans/ --json')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """List what ``args.paths`` hold; exit 1 when nothing readable was found."""
    from medvision.io import inventory

    found = inventory(args.paths)
    series = [entry.describe() for entry in found.entries]
    rejected = [{"path": path, "reason": reason} for path, reason in found.rejected]
    if args.json:
        json.dump({"series": series, "rejected": rejected}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(series, rejected)
    return 0 if series else 1


def _fmt(values: list[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def _print_table(series: list[dict[str, Any]], rejected: list[dict[str, str]]) -> None:
    for index, item in enumerate(series):
        title = item["series_uid"] or item["source"]
        print(f"[{index}] {item['modality']} {title}")
        if item.get("description"):
            print(f"    description : {item['description']}")
        print(f"    source      : {item['source']} ({item['files']} file(s))")
        print(f"    matrix      : {'x'.join(str(v) for v in item['matrix'])}, "
              f"{item['slices']} slice(s); volume {'x'.join(str(v) for v in item['shape'])}")
        print(f"    spacing     : {_fmt(item['spacing'])} mm, orientation {item['orientation']}")
        fourth = item.get("fourth_axis")
        if fourth:
            extra = (f", TR {fourth['repetition_time_s']:g} s"
                     if fourth.get("repetition_time_s") else "")
            extra += (f", b-values {', '.join(f'{b:g}' for b in fourth['b_values'])}"
                      if fourth.get("b_values") else "")
            print(f"    volumes     : {fourth['volumes']} ({fourth['kind']}), separated by "
                  f"{fourth['separated_by']}{extra}")
        if item.get("transfer_syntax"):
            print(f"    transfer    : {item['transfer_syntax']}")
        for warning in item["warnings"]:
            print(f"    warning     : {warning}")
        if item.get("error"):
            print(f"    error       : {item['error']}")
    if rejected:
        print(f"{len(rejected)} file(s) not used:")
        for item in rejected:
            print(f"    {item['reason']}")
    if not series:
        print("no readable image found")
