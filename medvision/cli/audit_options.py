"""The ``--audit-log`` / ``--audit-key`` / ``--signing-key`` options of audited commands.

Defaults: ``$MEDVISION_AUDIT_LOG`` or ``~/.local/share/medvision/audit.sqlite``, the
pseudonymisation key ``$MEDVISION_AUDIT_KEY`` or ``audit.key`` beside the log (created, mode
0600, when missing), and the Ed25519 signing key ``$MEDVISION_AUDIT_SIGNING_KEY`` (none: the
log is not signed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["add_audit_arguments", "auditor_from_args", "default_log_path", "signer_from_args"]


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
    parser.add_argument("--signing-key", type=Path, default=None,
                        help="Ed25519 key (from 'medvision audit keygen') that signs a "
                             "checkpoint of the log with every record; default "
                             "$MEDVISION_AUDIT_SIGNING_KEY, else unsigned")


def auditor_from_args(args: argparse.Namespace) -> Any:
    """An :class:`~medvision.audit.records.Auditor` for the paths in ``args``."""
    from medvision.audit.log import AuditLog
    from medvision.audit.records import Auditor, Pseudonymizer

    log_path = args.audit_log or default_log_path()
    if (args.audit_log is None and not os.environ.get("MEDVISION_AUDIT_LOG")
            and not log_path.exists()):
        # the first record at the default place: say where it is, once
        import logging

        logging.getLogger("medvision.progress").info(
            "audit records go to %s (the default; choose with --audit-log or "
            "$MEDVISION_AUDIT_LOG; 'medvision audit report' reads them)", log_path)
    key = args.audit_key
    if key is None:
        env = os.environ.get("MEDVISION_AUDIT_KEY")
        key = Path(env) if env else log_path.with_name("audit.key")
    return Auditor(AuditLog(log_path, signer=signer_from_args(args)),
                   Pseudonymizer.from_file(key))


def signer_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~medvision.audit.signing.Signer` named by ``--signing-key`` or
    ``$MEDVISION_AUDIT_SIGNING_KEY``, or ``None``."""
    from medvision.audit.signing import Signer

    path = getattr(args, "signing_key", None)
    if path is None and os.environ.get("MEDVISION_AUDIT_SIGNING_KEY"):
        path = Path(os.environ["MEDVISION_AUDIT_SIGNING_KEY"])
    return Signer.from_file(path) if path is not None else None
