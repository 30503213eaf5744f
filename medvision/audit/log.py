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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.atomic import write_text_atomic
from medvision.audit.signing import Checkpoint, Signer, Verifier
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
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
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
    """Result of checking a log.

    Attributes:
        ok: every check passed.
        records: records read.
        first_bad: the first record found wrong (or not covered by a signature).
        problem: what was wrong, in a sentence.
        checkpoints: signed checkpoints verified (0 without a public key).
        anchors: anchored checkpoints the log was checked against.
        notes: what was not checked (for example signatures without a public key).
    """

    ok: bool
    records: int
    first_bad: int | None = None
    problem: str = ""
    checkpoints: int = 0
    anchors: int = 0
    notes: tuple[str, ...] = ()


class AuditLog:
    """An audit log file (SQLite). Open it, append records, read or verify them.

    With a ``signer`` every append also stores a signed checkpoint of the new head, in the
    same transaction (see :mod:`medvision.audit.signing`). A log that holds checkpoints
    refuses appends without a signer, so it never grows an unsigned tail.
    """

    def __init__(self, path: str | os.PathLike[str], *, signer: Signer | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.signer = signer

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
        checkpoint: Checkpoint | None = None
        try:
            connection.execute("BEGIN IMMEDIATE")
            row = connection.execute(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            digest = _chain_hash(prev, seq, time, text)
            if self.signer is None:
                if connection.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone():
                    raise AuditError(
                        f"{self.path}: this audit log is signed; pass its signing key "
                        "(--signing-key) so new records are signed too")
            else:
                checkpoint = self.signer.sign(seq, digest, time)
            connection.execute("INSERT INTO records (seq, time, payload, prev_hash, hash) "
                               "VALUES (?, ?, ?, ?, ?)", (seq, time, text, prev, digest))
            if checkpoint is not None:
                connection.execute(
                    "INSERT INTO checkpoints (seq, hash, time, key_id, signature) "
                    "VALUES (?, ?, ?, ?, ?)", (checkpoint.seq, checkpoint.hash, checkpoint.time,
                                               checkpoint.key_id, checkpoint.signature))
            connection.execute("COMMIT")
        except (sqlite3.Error, AuditError) as e:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if isinstance(e, AuditError):
                raise
            raise AuditError(f"{self.path}: cannot append an audit record ({e})") from e
        finally:
            connection.close()
        self._write_head(checkpoint.as_dict() if checkpoint is not None
                         else {"records": seq, "hash": digest})
        return {"seq": seq, "hash": digest}

    def _write_head(self, head: dict[str, Any]) -> None:
        try:
            write_text_atomic(self.head_path, json.dumps(head))
        except OSError as e:
            raise AuditError(f"{self.head_path}: cannot write the log head ({e})") from e

    def checkpoints(self) -> list[Checkpoint]:
        """The signed checkpoints stored in the log, by sequence number."""
        if not self.path.is_file():
            raise AuditError(f"{self.path}: no audit log here")
        connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "checkpoints" not in tables:
                return []
            return [Checkpoint(seq=int(r[0]), hash=str(r[1]), time=str(r[2]), key_id=str(r[3]),
                               signature=str(r[4])) for r in connection.execute(
                "SELECT seq, hash, time, key_id, signature FROM checkpoints ORDER BY seq")]
        except sqlite3.Error as e:
            raise AuditError(f"{self.path}: unreadable checkpoints ({e})") from e
        finally:
            connection.close()

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest signed checkpoint, or ``None`` for an unsigned log."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

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

    def verify(self, *, verifier: Verifier | None = None,
               anchors: Sequence[tuple[Path, Checkpoint]] = ()) -> Verification:
        """Check the chain, the head, and (given a public key) every signed checkpoint.

        Args:
            verifier: the public key; then every checkpoint must verify and match the chain,
                and the last record must be covered by one (a rewritten or re-hashed log, or
                one whose checkpoints were removed, fails).
            anchors: checkpoints kept elsewhere (:func:`~medvision.audit.signing.read_anchors`):
                the log must still contain each anchored head (catches truncation and
                rewriting even by a holder of the signing key).
        """
        prev, expected_seq, count = GENESIS, 1, 0
        hashes: list[str] = []
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
            hashes.append(digest)
            prev, expected_seq = digest, expected_seq + 1
        head = self._read_head()
        if head is not None and (head.get("records") != count or head.get("hash") != prev):
            first_bad = min(count + 1, int(head.get("records", count + 1)))
            return Verification(False, count, first_bad,
                                f"the log ends at record {count} but its head says "
                                f"{head.get('records')} records (records removed at the end)")
        checkpoints = self.checkpoints()
        notes: list[str] = []
        if verifier is None:
            if checkpoints:
                notes.append(f"{len(checkpoints)} signed checkpoint(s) not checked: pass the "
                             "public key (--public-key)")
        else:
            bad = self._check_signatures(verifier, checkpoints, hashes, head)
            if bad is not None:
                return Verification(False, count, bad[0], bad[1])
        for path, anchor in anchors:
            problem = verifier.problem(anchor) if verifier is not None else None
            if problem is not None:
                return Verification(False, count, anchor.seq, f"anchor {path.name}: {problem}")
            if anchor.seq > count:
                return Verification(False, count, count + 1,
                                    f"anchor {path.name} records {anchor.seq} records but the "
                                    f"log has {count} (records removed after anchoring)")
            if hashes[anchor.seq - 1] != anchor.hash:
                return Verification(False, count, anchor.seq,
                                    f"record {anchor.seq} differs from the anchored head in "
                                    f"{path.name} (the log was rewritten)")
        return Verification(True, count, checkpoints=len(checkpoints) if verifier else 0,
                            anchors=len(anchors), notes=tuple(notes))

    def _read_head(self) -> dict[str, Any] | None:
        if not self.head_path.is_file():
            return None
        try:
            head = json.loads(self.head_path.read_text())
        except (OSError, ValueError) as e:
            raise AuditError(f"{self.head_path}: unreadable log head ({e})") from e
        return head if isinstance(head, dict) else {}

    @staticmethod
    def _check_signatures(verifier: Verifier, checkpoints: Sequence[Checkpoint],
                          hashes: Sequence[str],
                          head: dict[str, Any] | None) -> tuple[int, str] | None:
        """``(first bad record, problem)`` or ``None`` when every signature holds."""
        count = len(hashes)
        if count == 0:
            return None
        if not checkpoints:
            return 1, ("no signed checkpoint: the log was written without a signing key, or "
                       "its checkpoints were removed")
        for checkpoint in checkpoints:
            problem = verifier.problem(checkpoint)
            if problem is not None:
                return checkpoint.seq, f"the checkpoint at record {checkpoint.seq} is {problem}"
            if checkpoint.seq > count or hashes[checkpoint.seq - 1] != checkpoint.hash:
                return checkpoint.seq, (f"record {checkpoint.seq} does not match its signed "
                                        "checkpoint (the log was rewritten)")
        last = checkpoints[-1].seq
        if last < count:
            return last + 1, (f"records {last + 1} to {count} are not covered by a signed "
                              "checkpoint")
        if head is not None and "signature" in head:
            problem = verifier.problem(Checkpoint.from_dict(head))
            if problem is not None:
                return int(head.get("records", count)), f"the head file is {problem}"
        return None
