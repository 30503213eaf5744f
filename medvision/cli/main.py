"""Entry point of the ``medvision`` command: parses arguments, sets up logging, runs a subcommand.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``. A
:class:`~medvision.errors.MedvisionError` becomes one clear line on stderr and exit code 1
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from medvision._version import __version__
from medvision.cli import (
    analyze,
    audit,
    compare,
    convert,
    deid,
    docs,
    evaluate,
    export,
    info,
    pacs,
    pipelines,
    plan,
    pretrain,
    publish,
    synthesize,
    train,
)
from medvision.errors import ConfigError, MedvisionError, MissingDependencyError

__all__ = ["main"]

SUBCOMMANDS: tuple[ModuleType, ...] = (info, convert, pipelines, plan, pretrain, train,
                                        evaluate, compare, publish, export, analyze, pacs,
                                        audit, deid, synthesize, docs)

log = logging.getLogger("medvision")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def _configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medvision")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # what a person follows at a terminal (one line per training epoch): shown unless -q
    # (or a level above INFO) is asked for, as plain lines
    progress = logging.getLogger("medvision.progress")
    shown = logging.getLevelName(level.upper()) <= logging.WARNING
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(_JsonFormatter() if as_json else logging.Formatter("%(message)s"))
    progress.handlers = [plain] if shown else []
    progress.propagate = not shown
    progress.setLevel(logging.INFO if shown else logging.WARNING)
    warnings.showwarning = _show_warning


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_WARNED: set[tuple[str, str, int]] = set()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Python warnings go to the log, never straight to stderr. medvision's own (which never
    quote header values) keep their text; a library's text is withheld, because libraries
    quote the values they complain about (highdicom and pydicom print patient names): its
    category and origin are logged once per place, at INFO."""
    where = logging.getLogger("medvision.warnings")
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        where.warning("%s", message)
        return
    key = (category.__name__, filename, lineno)
    if key in _WARNED:
        return
    _WARNED.add(key)
    parts = Path(filename).parts
    origin = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts
                      else parts[-2:])
    where.info("a library warned (%s at %s:%d); its text is not logged: it may quote header "
               "values", category.__name__, origin, lineno)


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes, before or after the subcommand's name."""
    default: Any = argparse.SUPPRESS  # a subcommand's copy must not reset the top's value
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else default,
                        help="more log output (-v: INFO, -vv: DEBUG)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False if top else default,
                        help="only errors in the log")
    parser.add_argument("--pipelines-dir", action="append", type=Path, metavar="DIR",
                        default=[] if top else default,
                        help="a folder of pipelines (<name>/pipeline.yaml) searched before the "
                             "installed ones; repeatable; also $MEDVISION_PIPELINES "
                             "(os.pathsep-separated)")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in dict.fromkeys(action.choices.values()):
                found.append(sub)
                found.extend(_subparsers(sub))
    return found


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="medvision", description="Diagnose medical images and explain every prediction.",
        epilog="Exit codes: 0 success; 1 something failed (a study not ok, a broken audit "
               "chain, a failed result); 2 usage or configuration error (a path that does "
               "not exist, data not laid out as the pipeline says, no study found, a missing "
               "optional dependency); 141 the output's reader went away (a closed pipe). "
               "Run 'medvision COMMAND --help' for examples.",
        allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"medvision {__version__}")
    parser.add_argument("--log-level", default=None,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    _common_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    for sub in _subparsers(parser):
        _common_options(sub, top=False)
    return parser


def _level(args: argparse.Namespace) -> str:
    if args.log_level:
        return str(args.log_level)
    if args.quiet:
        return "ERROR"
    return {0: "WARNING", 1: "INFO"}.get(args.verbose, "DEBUG")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medvision`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (train --nproc)
    env = os.environ.get("MEDVISION_PIPELINES")
    if env:
        args.pipelines_dir = [*args.pipelines_dir, *(Path(p) for p in env.split(os.pathsep) if p)]
    _configure_logging(_level(args), args.log_json)
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
    except BrokenPipeError:
        # the reader went away (`medvision pipelines list | head -1`): stop quietly, as a
        # program killed by SIGPIPE would, and keep Python from complaining at exit when it
        # flushes standard output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
