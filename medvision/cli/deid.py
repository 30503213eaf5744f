"""``medvision deid INPUT... -o OUT``: de-identify DICOM (PS3.15 Basic Profile)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medvision.cli.audit_options import add_audit_arguments, auditor_from_args
from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``deid``."""
    parser = subparsers.add_parser(
        "deid", help="de-identify DICOM files (PS3.15 Basic Application Level Profile)",
        description="Consistent UID remapping, dates shifted per patient, pseudonymised names "
                    "and IDs, private tags removed. The same key gives the same pseudonyms. "
                    "Instances flagged (or likely) to have burned-in text are refused.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--key-file", type=Path,
                        help="secret key file (default: the audit pseudonymisation key)")
    parser.add_argument("--allow-unknown-burned-in", action="store_true",
                        help="accept instances without a Burned In Annotation value")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_audit_arguments(parser)
    examples(parser, 'medvision deid scans/ -o deidentified/ --key-file deid.key')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """De-identify; exit 1 when any instance was refused."""
    from medvision.audit.deid import deidentify
    from medvision.audit.records import Pseudonymizer

    if args.key_file is not None:
        pseudonymizer = Pseudonymizer.from_file(args.key_file)
    else:
        pseudonymizer = auditor_from_args(args).pseudonymizer
    key = pseudonymizer.pseudonym("deid-seed", "dicognito")
    result = deidentify(args.inputs, args.output, key=key,
                        allow_unknown_burned_in=args.allow_unknown_burned_in, force=args.force)
    print(f"wrote {len(result.written)} de-identified instance(s) under {args.output}; "
          f"refused {len(result.refused)}")
    for path, reason in result.refused:
        print(f"  refused {Path(path).name}: {reason}")
    return 1 if result.refused else 0
