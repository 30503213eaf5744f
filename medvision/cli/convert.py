"""``medvision convert PATH -o OUT``: write a series (or every series) as NIfTI."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvision.errors import DataError, SeriesAssemblyError

if TYPE_CHECKING:
    from medvision.io import SourceEntry

from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Register ``convert``."""
    parser = subparsers.add_parser(
        "convert", help="write a DICOM series or image as NIfTI",
        description="Convert one series to NIfTI (-o FILE.nii.gz), or every series found to "
                    "a folder (-o DIR). With several series and a file name, choose one with "
                    "--series (on a terminal you are asked).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or DICOMDIRs")
    parser.add_argument("-o", "--output", required=True,
                        help="output .nii/.nii.gz file, or a folder for every series")
    parser.add_argument("--series", help="series index (as listed by info) or Series UID")
    parser.add_argument("--irregular", choices=["resample", "error"], default="resample",
                        help="gantry tilt / uneven spacing: resample onto a regular grid "
                             "(default) or refuse")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    examples(parser, 'medvision convert scans/series1 -o series1.nii.gz', 'medvision convert scans/ -o nifti/')
    parser.set_defaults(run=run)


def _is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def _slug(entry: SourceEntry, index: int) -> str:
    number = entry.series.header.get("SeriesNumber") if entry.series else None
    stem = Path(entry.source).name.split(".")[0] if entry.series is None else ""
    parts = [f"{index:03d}", entry.series.modality if entry.series else entry.format]
    parts += [f"s{number}"] if number is not None else []
    parts += [stem] if stem else []
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)) + ".nii.gz"


def _choose(entries: tuple[SourceEntry, ...], wanted: str | None) -> SourceEntry:
    if wanted is not None:
        if wanted.isdigit() and int(wanted) < len(entries):
            return entries[int(wanted)]
        for entry in entries:
            if entry.series is not None and entry.series.key == wanted:
                return entry
        raise SeriesAssemblyError(f"no series {wanted!r}; run 'medvision info' to list them")
    if len(entries) == 1:
        return entries[0]
    listing = "\n".join(
        f"  [{i}] {e.series.modality + ' ' + e.series.key if e.series else e.source}"
        for i, e in enumerate(entries))
    if sys.stdin.isatty():
        print(f"{len(entries)} series found:\n{listing}")
        answer = input("convert which one? [index] ").strip()
        return _choose(entries, answer)
    raise SeriesAssemblyError(
        f"{len(entries)} series found; choose one with --series INDEX, or give -o a folder "
        f"to write each:\n{listing}")


def run(args: argparse.Namespace) -> int:
    """Convert; returns 1 when any series failed."""
    from medvision.io import inventory, write_volume
    from medvision.io.bids import write_sidecars

    found = inventory(args.paths)
    if not found.entries:
        reasons = "; ".join(reason for _, reason in found.rejected[:3])
        raise DataError(f"no readable image found in {', '.join(args.paths)}"
                        + (f" ({reasons})" if reasons else ""))
    output = Path(args.output)
    if _is_nifti(args.output):
        entry = _choose(found.entries, args.series)
        targets = [(entry, output)]
    else:
        selected = [_choose(found.entries, args.series)] if args.series else found.entries
        targets = [(e, output / _slug(e, found.entries.index(e))) for e in selected]
    existing = [str(path) for _, path in targets if path.exists()]
    if existing and not args.force:
        raise DataError(f"{existing[0]} exists; pass --force to overwrite")
    failures = 0
    for entry, path in targets:
        try:
            volume = entry.load(irregular=args.irregular)
            write_volume(volume, path)
            write_sidecars(volume, path)
        except DataError as e:
            failures += 1
            print(f"medvision: failed: {e}", file=sys.stderr)
            continue
        for warning in volume.warnings:
            log.warning("%s: %s", path, warning)
        shape = "x".join(str(s) for s in volume.spatial_shape)
        if volume.fourth_axis is not None:
            shape += f"x{volume.volumes} ({volume.fourth_axis.kind})"
        print(f"wrote {path} ({shape}, {volume.orientation})")
    return 1 if failures else 0
