"""``medvision compare A B``: is evaluation B better than evaluation A, case by case?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``compare``."""
    parser = subparsers.add_parser(
        "compare", help="paired comparison of two evaluations of the same cases",
        description="Pairs the cases of two 'medvision evaluate' folders (by path, else by file "
                    "name) and gives every metric for A and B with the paired "
                    "difference B - A: a bootstrap 95% CI over the same resampled cases "
                    "(within each class for classification), and how many cases each is "
                    "better on. Segmentation: mean and per-class Dice, HD95; classification: "
                    "accuracy, balanced accuracy, AUC, sensitivity and specificity (or each "
                    "class's recall).")
    parser.add_argument("first", type=Path, metavar="A", help="the reference evaluation folder")
    parser.add_argument("second", type=Path, metavar="B", help="the evaluation compared with A")
    parser.add_argument("-o", "--output", type=Path,
                        help="also write comparison.json and comparison.md in this folder")
    parser.add_argument("--json", action="store_true", help="the comparison as JSON on stdout")
    examples(parser, "medvision evaluate --pipeline hippocampus-seg --data DATA --split val -o eval-a",
             "medvision evaluate --pipeline runs/candidate --data DATA --split val -o eval-b",
             "medvision compare eval-a eval-b -o compare")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compare, print the table (or JSON), write the files when asked."""
    from medvision.atomic import write_text_atomic
    from medvision.evaluate.compare import compare_evaluations

    comparison = compare_evaluations(args.first, args.second)
    as_json = json.dumps(comparison.to_dict(), indent=2)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output / "comparison.json", as_json)
        write_text_atomic(args.output / "comparison.md", comparison.markdown())
    print(as_json if args.json else comparison.markdown().rstrip("\n"))
    return 0
