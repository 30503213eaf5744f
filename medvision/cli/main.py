"""Entry point of the ``medvision`` command: parses arguments, sets up logging, runs a subcommand.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``. A
:class:`~medvision.errors.MedvisionError` becomes one clear line on stderr and exit code 1
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from medvision import __version__
from medvision.cli import (
    analyze,
    audit,
    convert,
    deid,
    evaluate,
    export,
    info,
    pacs,
    publish,
    train,
)
from medvision.errors import ConfigError, MedvisionError, MissingDependencyError

__all__ = ["main"]

SUBCOMMANDS: tuple[ModuleType, ...] = (info, convert, train, evaluate, publish, export,
                                        analyze, pacs, audit, deid)

log = logging.getLogger("medvision")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def _configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else
                         logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medvision")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="medvision", description="Diagnose medical images and explain every prediction.",
        allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"medvision {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medvision`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.log_json)
    try:
        return int(args.run(args))
    except MedvisionError as e:
        if args.debug:
            raise
        print(f"medvision: error: {e}", file=sys.stderr)
        # 2 for what the caller must fix in the command or its files (as argparse does for
        # usage errors), 1 for everything else that failed
        return 2 if isinstance(e, ConfigError | MissingDependencyError) else 1
    except KeyboardInterrupt:
        print("medvision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
