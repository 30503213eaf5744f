"""The ``--audit-log`` / ``--audit-key`` options shared by commands that must be audited.

Defaults: ``$MEDVISION_AUDIT_LOG`` or ``~/.local/share/medvision/audit.sqlite``, and the key
``$MEDVISION_AUDIT_KEY`` or ``audit.key`` beside the log (created, mode 0600, when missing).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["add_audit_arguments", "auditor_from_args", "default_log_path"]


def default_log_path() -> Path:
    """Where the audit log lives unless told otherwise."""
    env = os.environ.get("MEDVISION_AUDIT_LOG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medvision" / "audit.sqlite"


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--audit-log`` and ``--audit-key`` to a subcommand."""
    parser.add_argument("--audit-log", type=Path, default=None,
                        help=f"audit log (SQLite); default {default_log_path()}")
    parser.add_argument("--audit-key", type=Path, default=None,
                        help="pseudonymisation key file; default audit.key beside the log")


def auditor_from_args(args: argparse.Namespace) -> Any:
    """An :class:`~medvision.audit.records.Auditor` for the paths in ``args``."""
    from medvision.audit.log import AuditLog
    from medvision.audit.records import Auditor, Pseudonymizer

    log_path = args.audit_log or default_log_path()
    key = args.audit_key
    if key is None:
        env = os.environ.get("MEDVISION_AUDIT_KEY")
        key = Path(env) if env else log_path.with_name("audit.key")
    return Auditor(AuditLog(log_path), Pseudonymizer.from_file(key))
