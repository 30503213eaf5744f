"""Audit records: who asked what of which model about which input, and what came out.

Patient and study identifiers never enter a record in the clear: they are replaced by keyed
HMAC-SHA-256 pseudonyms (:class:`Pseudonymizer`). The key lives in a file (created with mode
0600 when missing) and is never logged or recorded.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import secrets
import socket
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvision.audit.log import AuditLog
from medvision.errors import AuditError
from medvision.hashing import file_sha256

__all__ = ["AuditRecord", "Auditor", "Pseudonymizer", "local_actor"]


class Pseudonymizer:
    """Keyed pseudonyms: the same identifier and key always give the same pseudonym."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise AuditError("the pseudonymisation key must be at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(<key hidden>)"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle support, so Dask workers pseudonymise exactly as the client does."""
        return (Pseudonymizer, (self._key,))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, create: bool = True) -> Pseudonymizer:
        """Read the key file; create one (32 random bytes, hex, mode 0600) when missing."""
        key_path = Path(path)
        try:
            if not key_path.exists() and create:
                key_path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32))
            text = key_path.read_text().strip()
        except OSError as e:
            raise AuditError(f"{key_path}: cannot read or create the pseudonymisation key ({e})") \
                from e
        if not text:
            raise AuditError(f"{key_path}: the pseudonymisation key file is empty")
        return cls(text.encode())

    def pseudonym(self, kind: str, value: str) -> str:
        """``kind`` (patient, study ...) and value -> 32 hex digits of HMAC-SHA-256."""
        message = f"{kind}\x1f{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]


def local_actor() -> dict[str, str]:
    """The user and host running this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {"user": user, "host": socket.gethostname()}


@dataclass(frozen=True)
class AuditRecord:
    """One audited action. Every field is free of patient identity by construction."""

    action: str
    status: str
    actor: Mapping[str, str]
    reason: str | None = None
    patient_key: str | None = None
    study_key: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    pipeline: Mapping[str, Any] = field(default_factory=dict)
    software: Mapping[str, str] = field(default_factory=dict)
    outputs: tuple[Mapping[str, str], ...] = ()
    result: Mapping[str, Any] = field(default_factory=dict)
    durations: Mapping[str, float] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["outputs"] = [dict(o) for o in self.outputs]
        return data


class Auditor:
    """Appends records to a log on behalf of one actor."""

    def __init__(self, log: AuditLog, pseudonymizer: Pseudonymizer, *,
                 actor: Mapping[str, str] | None = None) -> None:
        self.log = log
        self.pseudonymizer = pseudonymizer
        self.actor = dict(actor or local_actor())

    def record(self, record: AuditRecord) -> dict[str, Any]:
        """Append ``record`` with the current UTC time; raises AuditError on failure."""
        time = datetime.now(UTC).isoformat(timespec="microseconds")
        return self.log.append(time, record.payload())

    @staticmethod
    def outputs(paths: Iterable[Path], *, relative_to: Path) -> tuple[dict[str, str], ...]:
        """``{"path", "sha256"}`` for each output file."""
        return tuple({"path": str(p.relative_to(relative_to)), "sha256": file_sha256(p)}
                     for p in sorted(paths) if p.is_file())


def record_run(auditor: Auditor, *, action: str, status: str, pipeline: Any,
               inputs: Mapping[str, Any], outputs: Iterable[Path], result: Mapping[str, Any],
               seconds: float, reason: str | None = None,
               weights_sha256: str | None = None) -> dict[str, Any]:
    """Append the record of a training or evaluation run (the same provenance fields as an
    analysis: pipeline name, version, config hash, weights hash, software versions).

    Raises:
        AuditError: the record could not be written.
    """
    import os

    from medvision.config import config_hash
    from medvision.provenance import software_versions

    files = [p for p in outputs if p.is_file()]
    root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
    described = {"name": pipeline.name, "version": pipeline.version,
                 "config_hash": config_hash(pipeline)}
    if weights_sha256:
        described["weights_sha256"] = weights_sha256
    return auditor.record(AuditRecord(
        action=action, status=status, actor=auditor.actor, reason=reason, inputs=dict(inputs),
        pipeline=described, software=software_versions(),
        outputs=Auditor.outputs(files, relative_to=root), result=dict(result),
        durations={"total_s": round(seconds, 4)}))


def items_digest(items: Any) -> dict[str, Any]:
    """Count and SHA-256 of a labelled item list (file paths or array bytes, and labels)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    count = 0
    for item in items:
        image = item["image"]
        digest.update(image.encode() if isinstance(image, str) else np.ascontiguousarray(image).tobytes())
        if "label" in item:
            digest.update(str(item["label"]).encode())
        for key in ("boxes", "labels"):  # detection items
            if key in item:
                digest.update(np.ascontiguousarray(item[key]).tobytes())
        count += 1
    return {"items": count, "items_sha256": digest.hexdigest()}
