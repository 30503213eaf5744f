"""An append-only, hash-chained audit log in SQLite.

Each record stores the canonical JSON of its payload, the hash of the record before it, and its
own hash ``SHA-256(prev_hash || seq || canonical payload)``. Editing, deleting, inserting or
reordering any record breaks the chain at that record, and :meth:`AuditLog.verify` names it.
Removing records from the *end* leaves a valid shorter chain, so the head (record count and
last hash) is also written to a sidecar file ``<log>.head`` after every append: ``verify``
compares the chain with it, and an auditor can keep copies of heads elsewhere.

SQLite triggers refuse UPDATE and DELETE through the library; the hashes catch edits made
around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.atomic import write_text_atomic
from medvision.errors import AuditError

__all__ = ["AuditLog", "Verification", "canonical_json"]

GENESIS = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""


def canonical_json(payload: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _chain_hash(prev_hash: str, seq: int, time: str, payload: str) -> str:
    digest = hashlib.sha256()
    for part in (prev_hash, str(seq), time, payload):
        digest.update(part.encode())
        digest.update(b"\x1f")
    return digest.hexdigest()


@dataclass(frozen=True)
class Verification:
    """Result of checking a log: ``ok``, how many records, and the first bad one."""

    ok: bool
    records: int
    first_bad: int | None = None
    problem: str = ""


class AuditLog:
    """An audit log file (SQLite). Open it, append records, read or verify them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            return connection
        except (sqlite3.Error, OSError) as e:
            raise AuditError(f"{self.path}: cannot open the audit log ({e})") from e

    def append(self, time: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Append one record atomically; returns ``{"seq", "hash"}``.

        Raises:
            AuditError: the record could not be written (the caller must not publish an
                unaudited result).
        """
        text = canonical_json(payload)
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            row = connection.execute(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            digest = _chain_hash(prev, seq, time, text)
            connection.execute("INSERT INTO records (seq, time, payload, prev_hash, hash) "
                               "VALUES (?, ?, ?, ?, ?)", (seq, time, text, prev, digest))
            connection.execute("COMMIT")
        except sqlite3.Error as e:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise AuditError(f"{self.path}: cannot append an audit record ({e})") from e
        finally:
            connection.close()
        self._write_head(seq, digest)
        return {"seq": seq, "hash": digest}

    def _write_head(self, seq: int, digest: str) -> None:
        try:
            write_text_atomic(self.head_path, json.dumps({"records": seq, "hash": digest}))
        except OSError as e:
            raise AuditError(f"{self.head_path}: cannot write the log head ({e})") from e

    def rows(self) -> Iterator[tuple[int, str, str, str, str]]:
        """Raw rows ``(seq, time, payload, prev_hash, hash)`` in storage order of ``seq``."""
        if not self.path.is_file():
            raise AuditError(f"{self.path}: no audit log here")
        connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            yield from connection.execute(
                "SELECT seq, time, payload, prev_hash, hash FROM records ORDER BY rowid")
        except sqlite3.Error as e:
            raise AuditError(f"{self.path}: unreadable audit log ({e})") from e
        finally:
            connection.close()

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record's payload with ``seq``, ``time`` and ``hash`` added."""
        for seq, time, payload, _prev, digest in self.rows():
            yield {"seq": seq, "time": time, "hash": digest, **json.loads(payload)}

    def verify(self) -> Verification:
        """Check the chain from the first record to the head; name the first bad record."""
        prev, expected_seq, count = GENESIS, 1, 0
        for seq, time, payload, prev_hash, digest in self.rows():
            count += 1
            if seq != expected_seq:
                return Verification(False, count, seq, f"record {seq} found where record "
                                    f"{expected_seq} should be (deleted, inserted or reordered)")
            if prev_hash != prev:
                return Verification(False, count, seq, f"record {seq} does not follow record "
                                    f"{seq - 1} (its previous-hash link is broken)")
            if _chain_hash(prev_hash, seq, time, payload) != digest:
                return Verification(False, count, seq, f"record {seq} was modified (its content "
                                    "does not match its hash)")
            prev, expected_seq = digest, expected_seq + 1
        if self.head_path.is_file():
            head = json.loads(self.head_path.read_text())
            if head.get("records") != count or head.get("hash") != prev:
                first_bad = min(count + 1, int(head.get("records", count + 1)))
                return Verification(False, count, first_bad,
                                    f"the log ends at record {count} but its head says "
                                    f"{head.get('records')} records (records removed at the end)")
        return Verification(True, count)
