"""The bridge's durable state: a spool of received instances and a SQLite job table.

An instance is acknowledged only after its file is on disk (temporary file with a unique
name, fsync, atomic rename, fsync of the folder) and its row is committed. Study states::

    receiving --(quiet period)--> processing --(results queued)--> sending --> done
        ^                              |                               |
        |                              +--(error: retried later)-------+--> failed
        +------ new instance, crash recovery, `pacs retry` ------------+

Every path ends in ``done``, ``failed`` or ``rejected``: an analysis that raises goes back to
``receiving`` with a delay (so a full disk recovers without a restart) until ``max_attempts``,
then ``failed`` with the reason; an analysis that cannot run (no readable image, no route,
input the pipeline refuses) is ``rejected`` with the reason, and one that ran and failed is
``failed``, both at once (``pacs retry`` re-runs them after a fix). Result objects go to an
outbox (one row per result SOP Instance UID) whose items are ``pending`` -> ``sent`` (or
``committed`` with storage commitment) or, after ``max_attempts`` tries or a permanent refusal,
``failed``; ``pacs retry`` re-queues them. The files an outbox row points to are never
rewritten: each analysis writes into its own folder.

Backoff is computed from the last try and the attempt count with the *current* settings, so
changing ``retry`` in the configuration applies to items already waiting.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from medvision.errors import PacsError, UnknownStudyError

__all__ = ["HEARTBEAT_S", "PROBLEM_STATES", "BridgeStore", "OutboxItem", "OutboxState",
           "ResultObject", "StudyJob", "StudyState"]


class StudyState(StrEnum):
    """Where a study is on its way through the bridge (the ``studies.state`` column)."""

    RETRIEVING = "retrieving"
    RECEIVING = "receiving"
    PROCESSING = "processing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


class OutboxState(StrEnum):
    """Where a result object is (the ``outbox.state`` column)."""

    PENDING = "pending"
    SENT = "sent"
    SENT_AWAITING = "sent_awaiting"
    COMMITTED = "committed"
    FAILED = "failed"


#: States a study ends in until ``pacs retry`` (or new instances) re-open it.
PROBLEM_STATES = (StudyState.FAILED, StudyState.REJECTED)
#: A running bridge writes its heartbeat at least this often (seconds).
HEARTBEAT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, folder TEXT NOT NULL, calling_ae TEXT NOT NULL,
    first_received REAL NOT NULL, last_received REAL NOT NULL, instances INTEGER NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS remote_studies (
    source TEXT NOT NULL, study_uid TEXT NOT NULL, done_signature TEXT,
    pending_signature TEXT, pending_since REAL NOT NULL DEFAULT 0, series TEXT NOT NULL DEFAULT '{}',
    updated REAL NOT NULL, PRIMARY KEY (source, study_uid)
);
CREATE TABLE IF NOT EXISTS bridge (
    id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL, host TEXT NOT NULL,
    started REAL NOT NULL, heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT NOT NULL, role TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    last_success REAL, last_error TEXT, last_error_at REAL, PRIMARY KEY (role, name)
);
"""
#: Columns added after the first release, with their definitions (added to older databases).
_MIGRATIONS = {
    "studies": {"retry_after": "REAL NOT NULL DEFAULT 0", "analyses": "INTEGER NOT NULL DEFAULT 0",
                "source": "TEXT NOT NULL DEFAULT 'dimse'",
                "complete": "INTEGER NOT NULL DEFAULT 0"},
    "outbox": {"last_try": "REAL NOT NULL DEFAULT 0", "queued": "REAL NOT NULL DEFAULT 0",
               "note": "TEXT", "analysis": "INTEGER NOT NULL DEFAULT 0",
               "commit_tx": "TEXT", "commit_requested": "REAL NOT NULL DEFAULT 0",
               "destination": "TEXT NOT NULL DEFAULT 'destination'", "series_uid": "TEXT",
               "sop_class_uid": "TEXT"},
}


@dataclass(frozen=True)
class StudyJob:
    """A study the worker should analyse."""

    study_uid: str
    folder: Path
    calling_ae: str
    instances: int
    analysis: int = 1
    source: str = "dimse"


@dataclass(frozen=True)
class ResultObject:
    """A result an analysis queues: what the sender needs, typed, from the analysis itself
    (nothing is read back from the file). ``kind``: SR, SEG, PM, SC or FHIR."""

    sop_uid: str
    path: Path
    kind: str
    destination: str = "destination"
    series_uid: str | None = None
    sop_class_uid: str | None = None


@dataclass(frozen=True)
class OutboxItem:
    """A result object waiting to be sent."""

    sop_uid: str
    study_uid: str
    path: Path
    kind: str
    attempts: int
    destination: str = "destination"
    sop_class_uid: str | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backoff_delay(attempts: int, *, backoff_s: float, max_backoff_s: float) -> float:
    """Seconds to wait after ``attempts`` failed tries: doubling, capped."""
    if attempts <= 0:
        return 0.0
    return float(min(max_backoff_s, backoff_s * 2 ** min(attempts - 1, 30)))


class BridgeStore:
    """Spool folder and job database under one working directory."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.spool = self.workdir / "spool"
        self.results = self.workdir / "results"
        self.outgoing = self.workdir / "outgoing"
        self.db_path = self.workdir / "jobs.sqlite"
        try:
            for folder in (self.spool, self.results, self.outgoing):
                folder.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
                for table, columns in _MIGRATIONS.items():
                    present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for name, definition in columns.items():
                        if name not in present:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        except (OSError, sqlite3.Error) as e:
            raise PacsError(f"{self.workdir}: cannot open the bridge's work folder ({e})") from e

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        try:
            yield connection
        finally:
            connection.close()

    @staticmethod
    def study_folder_name(study_uid: str) -> str:
        """Spool folder of a study: a hash, so no identifier appears in paths."""
        return hashlib.sha256(study_uid.encode()).hexdigest()[:20]

    # --- receiving -------------------------------------------------------------------------
    def store_instance(self, *, study_uid: str, sop_uid: str, data: bytes,
                       calling_ae: str, source: str = "dimse", hold: bool = False) -> Path:
        """Write one received instance durably and record it (idempotent for repeats).

        The temporary file's name is unique per process, thread and call, so the same
        instance arriving on several associations at once is written several times and
        committed once. A failed write leaves no temporary file behind. ``calling_ae`` is who
        sent it (an AE title, a STOW-RS sender's name, a watched source's name); ``source``
        the input it came by. With ``hold`` (retrieval in progress) the study waits as
        ``retrieving`` until :meth:`release_retrieved`, instead of for a quiet period.

        Raises:
            OSError: the file could not be written (disk full...).
            PacsError: the job database could not be updated.
        """
        target = self.write_instance(study_uid, sop_uid, data)
        self.record_instances(study_uid, [(sop_uid, target)], calling_ae=calling_ae,
                              source=source, hold=hold)
        return target

    def write_instance(self, study_uid: str, sop_uid: str, data: bytes, *,
                       sync_folder: bool = True) -> Path:
        """Write one instance's file durably (fsync, atomic rename and, with
        ``sync_folder``, fsync of its folder); not yet recorded: see
        :meth:`record_instances`.

        Raises:
            OSError: the file could not be written.
        """
        folder = self.spool / self.study_folder_name(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"
        target = folder / name
        tmp = folder / (f".{name}.{os.getpid()}.{threading.get_ident()}."
                        f"{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync_folder:
            _fsync_dir(folder)
        return target

    def record_instances(self, study_uid: str, instances: list[tuple[str, Path]], *,
                         calling_ae: str, source: str = "dimse", hold: bool = False) -> int:
        """Record written instances ``(sop_uid, path)`` of one study in one transaction
        (fsyncs their folder first); returns how many were new.

        Raises:
            OSError: the folder could not be synced.
            PacsError: the job database could not be updated.
        """
        if not instances:
            return 0
        folder = self.spool / self.study_folder_name(study_uid)
        _fsync_dir(folder)
        now = time.time()
        try:
            with self._db() as db:
                db.execute("BEGIN IMMEDIATE")
                new = sum(db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?)",
                                     (sop_uid, study_uid, str(path), now)).rowcount
                          for sop_uid, path in instances)
                row = db.execute("SELECT state FROM studies WHERE study_uid = ?",
                                 (study_uid,)).fetchone()
                state = "retrieving" if hold else "receiving"
                if row is None:
                    db.execute("INSERT INTO studies (study_uid, folder, calling_ae, "
                               "first_received, last_received, instances, state, updated, "
                               "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (study_uid, str(folder), calling_ae, now, now, new, state, now,
                                source))
                elif new:  # new instances: (re)open the study for analysis
                    db.execute("UPDATE studies SET last_received = ?, instances = instances + ?, "
                               "state = ?, attempts = 0, retry_after = 0, error = NULL, "
                               "complete = 0, updated = ? WHERE study_uid = ?",
                               (now, new, state, now, study_uid))
                db.execute("COMMIT")
        except sqlite3.Error as e:
            raise PacsError(f"{self.db_path}: cannot record an instance ({e})") from e
        return new

    # --- watching DICOMweb sources ------------------------------------------------------------
    def remote_study(self, source: str, study_uid: str) -> tuple[str | None, str | None, float,
                                                                 dict[str, int]]:
        """What a watched source's study looked like: the signature last retrieved, the one
        seen pending (and since when) and the instance count per retrieved series."""
        import json

        with self._db() as db:
            row = db.execute("SELECT done_signature, pending_signature, pending_since, series "
                             "FROM remote_studies WHERE source = ? AND study_uid = ?",
                             (source, study_uid)).fetchone()
        if row is None:
            return None, None, 0.0, {}
        return row[0], row[1], float(row[2]), json.loads(row[3])

    def remote_pending(self, source: str, study_uid: str, signature: str) -> None:
        """A watched study changed (or is new): note its signature and since when."""
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO remote_studies (source, study_uid, pending_signature, "
                       "pending_since, updated) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(source, study_uid) DO UPDATE SET pending_signature = "
                       "excluded.pending_signature, pending_since = excluded.pending_since, "
                       "updated = excluded.updated", (source, study_uid, signature, now, now))

    def release_retrieved(self, source: str, study_uid: str, signature: str,
                          series: dict[str, int]) -> bool:
        """Everything needed of a watched study is in the spool: record what was retrieved
        and queue the study for analysis at once, in one transaction (a crash before this
        retrieves again; after it, never again). Returns whether a study was queued."""
        import json

        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO remote_studies (source, study_uid, done_signature, "
                       "pending_signature, series, updated) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT(source, study_uid) DO UPDATE SET done_signature = "
                       "excluded.done_signature, pending_signature = excluded.pending_signature, "
                       "series = excluded.series, updated = excluded.updated",
                       (source, study_uid, signature, signature, json.dumps(series), now))
            queued = db.execute(f"UPDATE studies SET state = '{StudyState.RECEIVING}', "
                                "complete = 1, updated = ? WHERE study_uid = ? AND "
                                f"state = '{StudyState.RETRIEVING}'",
                                (now, study_uid)).rowcount
            db.execute("COMMIT")
        return bool(queued)

    def own_series(self) -> set[str]:
        """Series Instance UIDs of results this bridge produced (never analysed as input)."""
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT series_uid FROM outbox "
                                             "WHERE series_uid IS NOT NULL")}

    # --- sources and destinations, for `pacs status` ----------------------------------------
    def register_endpoints(self, endpoints: list[tuple[str, str, str]]) -> None:
        """The running configuration's sources and destinations ``(name, role, detail)``."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            keep = {(role, name) for name, role, _ in endpoints}
            for role, name in db.execute("SELECT role, name FROM endpoints").fetchall():
                if (role, name) not in keep:
                    db.execute("DELETE FROM endpoints WHERE role = ? AND name = ?", (role, name))
            for name, role, detail in endpoints:
                db.execute("INSERT INTO endpoints (name, role, detail) VALUES (?, ?, ?) "
                           "ON CONFLICT(role, name) DO UPDATE SET detail = excluded.detail",
                           (name, role, detail))
            db.execute("COMMIT")

    def endpoint_result(self, name: str, error: str | None = None, *,
                        role: str = "source") -> None:
        """Record a success (``error`` None) or a failure of a source or destination."""
        now = time.time()
        with self._db() as db:
            if error is None:
                db.execute("UPDATE endpoints SET last_success = ? WHERE role = ? AND name = ?",
                           (now, role, name))
            else:
                db.execute("UPDATE endpoints SET last_error = ?, last_error_at = ? "
                           "WHERE role = ? AND name = ?", (error[:500], now, role, name))

    def clean_temporary_files(self) -> int:
        """Remove temporary files left by writes that were interrupted; returns how many."""
        removed = 0
        for folder in (self.spool, self.outgoing):
            for path in folder.rglob(".*.tmp"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- analysing -------------------------------------------------------------------------
    def recover(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Studies left in ``processing`` (by a crash, or by a failure that could not be
        recorded) go back to the queue, except those in ``keep`` (being analysed now).
        Returns how many."""
        with self._db() as db:
            stuck = [r[0] for r in db.execute(
                "SELECT study_uid FROM studies WHERE state = "
                f"'{StudyState.PROCESSING}'") if r[0] not in keep]
            for uid in stuck:
                db.execute(f"UPDATE studies SET state = '{StudyState.RECEIVING}', updated = ? "
                           "WHERE study_uid = ? AND state = "
                           f"'{StudyState.PROCESSING}'", (time.time(), uid))
            return len(stuck)

    def claim_ready(self, quiet_period_s: float) -> StudyJob | None:
        """The oldest study quiet for ``quiet_period_s`` (and past any retry delay), moved to
        ``processing``; safe to call from several worker threads."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT study_uid, folder, calling_ae, instances, analyses, source "
                             f"FROM studies WHERE state = '{StudyState.RECEIVING}' AND "
                             "(last_received <= ? OR complete = 1) AND retry_after <= ? "
                             "ORDER BY last_received "
                             "LIMIT 1", (now - quiet_period_s, now)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute(f"UPDATE studies SET state = '{StudyState.PROCESSING}', "
                       "attempts = attempts + 1, analyses = analyses + 1, updated = ? "
                       "WHERE study_uid = ?",
                       (now, row[0]))
            db.execute("COMMIT")
        return StudyJob(study_uid=row[0], folder=Path(row[1]), calling_ae=row[2],
                        instances=row[3], analysis=int(row[4]) + 1, source=row[5])

    def finish_analysis(self, study_uid: str, outputs: list[ResultObject], *,
                        analysis: int = 0) -> str:
        """Queue the results and move the study on, in one transaction; returns the study's
        new state.

        A result already queued (same SOP Instance UID: the same inputs gave the same object)
        is not queued again. The study is ``sending`` while any of its results waits, else
        ``done`` (or ``failed`` when an earlier result could not be delivered). A study that
        received new instances meanwhile stays ``receiving``.
        """
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for result in outputs:
                db.execute("INSERT INTO outbox (sop_uid, study_uid, path, kind, state, next_try, "
                           "queued, analysis, destination, series_uid, sop_class_uid) "
                           f"VALUES (?, ?, ?, ?, '{OutboxState.PENDING}', ?, ?, ?, ?, ?, ?) "
                           "ON CONFLICT(sop_uid) DO NOTHING",
                           (result.sop_uid, study_uid, str(result.path), result.kind, now, now,
                            analysis, result.destination, result.series_uid,
                            result.sop_class_uid))
            state = self._settled_state(db, study_uid)
            db.execute("UPDATE studies SET state = ?, error = NULL, updated = ? "
                       f"WHERE study_uid = ? AND state = '{StudyState.PROCESSING}'",
                       (state, now, study_uid))
            db.execute("COMMIT")
        return state

    def reject_analysis(self, study_uid: str, reason: str) -> str:
        """The analysis cannot run on this study (nothing readable, no route, input the
        pipeline refuses): ``rejected`` with the reason, at once. Returns the new state."""
        with self._db() as db:
            changed = db.execute("UPDATE studies SET state = ?, error = ?, updated = ? "
                                 "WHERE study_uid = ? AND state = ?",
                                 (StudyState.REJECTED, reason, time.time(), study_uid,
                                  StudyState.PROCESSING)).rowcount
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
        if changed:
            return StudyState.REJECTED
        return str(row[0]) if row else "unknown"

    def heartbeat(self, *, started: float) -> None:
        """A running bridge says so (``pacs status`` shows it, and whether it is alive)."""
        import socket

        with self._db() as db:
            db.execute("INSERT INTO bridge (id, pid, host, started, heartbeat) VALUES "
                       "(1, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET pid = excluded.pid, "
                       "host = excluded.host, started = excluded.started, "
                       "heartbeat = excluded.heartbeat",
                       (os.getpid(), socket.gethostname(), started, time.time()))

    def stopped(self) -> None:
        """The bridge stopped cleanly."""
        with self._db() as db:
            db.execute("DELETE FROM bridge WHERE pid = ?", (os.getpid(),))

    def fail_analysis(self, study_uid: str, error: str, *, retry_in_s: float | None,
                      max_attempts: int) -> str:
        """An analysis raised: try again in ``retry_in_s`` (until ``max_attempts``), else
        ``failed``. ``retry_in_s=None`` fails at once. Returns the new state."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT attempts, state FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
            if row is None or row[1] != "processing":
                db.execute("COMMIT")
                return str(row[1]) if row else "unknown"
            final = retry_in_s is None or int(row[0]) >= max_attempts
            state = "failed" if final else "receiving"
            db.execute("UPDATE studies SET state = ?, error = ?, retry_after = ?, updated = ? "
                       "WHERE study_uid = ?",
                       (state, error, now + (retry_in_s or 0.0), now, study_uid))
            db.execute("COMMIT")
        return state

    @staticmethod
    def _settled_state(db: sqlite3.Connection, study_uid: str) -> str:
        counts = dict(db.execute("SELECT state, COUNT(*) FROM outbox WHERE study_uid = ? "
                                 "GROUP BY state", (study_uid,)).fetchall())
        if counts.get("pending") or counts.get("sent_awaiting"):
            return "sending"
        return "failed" if counts.get("failed") else "done"

    def previous_results(self, study_uid: str, kind: str) -> list[Path]:
        """Files of earlier results of ``kind`` for a study, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT path FROM outbox WHERE study_uid = ? AND kind = ? "
                              "ORDER BY queued", (study_uid, kind)).fetchall()
        return [Path(r[0]) for r in rows]

    # --- sending ---------------------------------------------------------------------------
    def due_outbox(self, *, backoff_s: float = 2.0, max_backoff_s: float = 300.0
                   ) -> list[OutboxItem]:
        """Results whose next try is due under the given (current) retry settings."""
        now = time.time()
        with self._db() as db:
            rows = db.execute("SELECT sop_uid, study_uid, path, kind, attempts, last_try, "
                              "destination, sop_class_uid FROM outbox WHERE state = "
                              f"'{OutboxState.PENDING}' "
                              "ORDER BY queued").fetchall()
        return [OutboxItem(r[0], r[1], Path(r[2]), r[3], r[4], r[6], r[7]) for r in rows
                if r[5] + backoff_delay(r[4], backoff_s=backoff_s,
                                        max_backoff_s=max_backoff_s) <= now]

    def mark_sent(self, sop_uid: str, *, note: str | None = None,
                  awaiting_commitment: bool = False) -> str | None:
        """One result delivered (``note``: a warning status worth keeping). With
        ``awaiting_commitment`` it waits for the peer's storage commitment before it counts.
        Returns the study's state."""
        state = "sent_awaiting" if awaiting_commitment else "sent"
        return self._settle(sop_uid, "UPDATE outbox SET state = ?, error = NULL, note = ?, "
                            "last_try = ? WHERE sop_uid = ?", (state, note, time.time(), sop_uid))

    def mark_committed(self, sop_uid: str, transaction_uid: str) -> str | None:
        """The peer confirmed (storage commitment) that it keeps the object, in the
        transaction the bridge asked it under (a report naming another one changes nothing)."""
        return self._settle(sop_uid, f"UPDATE outbox SET state = '{OutboxState.COMMITTED}', "
                                     "error = NULL WHERE sop_uid = ? AND "
                                     f"state = '{OutboxState.SENT_AWAITING}' AND commit_tx = ?",
                            (sop_uid, transaction_uid))

    def commitment_transaction_known(self, transaction_uid: str) -> bool:
        """Whether the bridge asked for storage commitment under this Transaction UID."""
        with self._db() as db:
            return db.execute("SELECT 1 FROM outbox WHERE commit_tx = ? LIMIT 1",
                              (transaction_uid,)).fetchone() is not None

    def mark_failed_send(self, sop_uid: str, error: str, *, max_attempts: int,
                         permanent: bool = False) -> str:
        """A try failed: ``pending`` again (its delay grows with the attempts) or, after
        ``max_attempts`` tries or a ``permanent`` refusal, ``failed``. Returns the item's state."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT attempts, study_uid FROM outbox WHERE sop_uid = ?",
                             (sop_uid,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return "unknown"
            attempts = int(row[0]) + 1
            state = "failed" if permanent or attempts >= max_attempts else "pending"
            db.execute("UPDATE outbox SET attempts = ?, last_try = ?, error = ?, state = ? "
                       "WHERE sop_uid = ?", (attempts, time.time(), error, state, sop_uid))
            self._update_study(db, row[1])
            db.execute("COMMIT")
        return state

    def _settle(self, sop_uid: str, sql: str, params: tuple[Any, ...]) -> str | None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(sql, params)
            row = db.execute("SELECT study_uid FROM outbox WHERE sop_uid = ?",
                             (sop_uid,)).fetchone()
            state = self._update_study(db, row[0]) if row else None
            db.execute("COMMIT")
        return state

    def _update_study(self, db: sqlite3.Connection, study_uid: str) -> str:
        """Move a ``sending`` study on when none of its results waits any more."""
        state = self._settled_state(db, study_uid)
        if state != "sending":
            failed = db.execute("SELECT error FROM outbox WHERE study_uid = ? AND "
                                f"state = '{OutboxState.FAILED}' LIMIT 1", (study_uid,)).fetchone()
            db.execute("UPDATE studies SET state = ?, error = COALESCE(?, error), updated = ? "
                       f"WHERE study_uid = ? AND state = '{StudyState.SENDING}'",
                       (state, f"result not delivered: {failed[0]}" if failed else None,
                        time.time(), study_uid))
        return state

    def awaiting_commitment(self, *, requested: bool) -> list[tuple[OutboxItem, float]]:
        """Sent results waiting for storage commitment: those not asked for yet
        (``requested=False``) or those asked for, with when."""
        with self._db() as db:
            rows = db.execute("SELECT sop_uid, study_uid, path, kind, attempts, "
                              "commit_requested, destination, sop_class_uid FROM outbox WHERE "
                              f"state = '{OutboxState.SENT_AWAITING}' AND "
                              + ("commit_requested > 0" if requested else "commit_requested = 0")
                              ).fetchall()
        return [(OutboxItem(r[0], r[1], Path(r[2]), r[3], r[4], r[6], r[7]), float(r[5]))
                for r in rows]

    def mark_commitment_requested(self, sop_uids: list[str], transaction_uid: str | None
                                  ) -> None:
        """Storage commitment is asked for these results under ``transaction_uid`` (``None``:
        not asked after all; asked again next round)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for uid in sop_uids:
                db.execute("UPDATE outbox SET commit_tx = ?, commit_requested = ? "
                           f"WHERE sop_uid = ? AND state = '{OutboxState.SENT_AWAITING}'",
                           (transaction_uid, time.time() if transaction_uid else 0.0, uid))
            db.execute("COMMIT")

    def commitment_failed(self, sop_uid: str, reason: str, *, max_attempts: int,
                          transaction: str | None = None) -> str:
        """The peer did not commit (or did not answer in time): send the object again, up to
        ``max_attempts`` in all. With ``transaction``, only an item asked for under it."""
        with self._db() as db:
            changed = db.execute(
                f"UPDATE outbox SET state = '{OutboxState.PENDING}', commit_tx = NULL, "
                "commit_requested = 0 "
                f"WHERE sop_uid = ? AND state = '{OutboxState.SENT_AWAITING}'"
                + (" AND commit_tx = ?" if transaction is not None else ""),
                (sop_uid, transaction) if transaction is not None else (sop_uid,)).rowcount
        if transaction is not None and not changed:
            return "unknown"
        return self.mark_failed_send(sop_uid, reason, max_attempts=max_attempts)

    def retry(self, study: str | None = None) -> int:
        """Re-queue failed results and failed or rejected studies (all, or one study by its
        key as ``pacs status`` shows it); returns how many were re-queued.

        Raises:
            PacsError: ``study`` names no study of this work folder.
        """
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            uids = [r[0] for r in db.execute("SELECT study_uid FROM studies")
                    if study is None or self.study_folder_name(r[0]) == study]
            if study is not None and not uids:
                db.execute("ROLLBACK")
                raise UnknownStudyError(f"{self.workdir}: no study {study!r} here ('medvision "
                                        "pacs status' lists the study keys)")
            count = 0
            for uid in uids:
                count += db.execute(f"UPDATE outbox SET state = '{OutboxState.PENDING}', attempts "
                                    "= 0, "
                                    "last_try = 0 WHERE study_uid = ? AND state = "
                                    f"'{OutboxState.FAILED}'",
                                    (uid,)).rowcount
                if db.execute("SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND "
                              f"state = '{OutboxState.PENDING}'", (uid,)).fetchone()[0]:
                    db.execute(f"UPDATE studies SET state = '{StudyState.SENDING}', error = NULL, "
                               "updated = ? "
                               f"WHERE study_uid = ? AND state IN ('{StudyState.FAILED}', "
                               f"'{StudyState.DONE}')", (now, uid))
                else:
                    count += db.execute(f"UPDATE studies SET state = '{StudyState.RECEIVING}', "
                                        "attempts = 0, "
                                        "retry_after = 0, error = NULL, updated = ? WHERE "
                                        f"study_uid = ? AND state IN ('{StudyState.FAILED}', "
                                        f"'{StudyState.REJECTED}')",
                                        (now, uid)).rowcount
            db.execute("COMMIT")
        return count

    def instance_paths(self, study_uid: str) -> list[Path]:
        """Spool files of a study."""
        with self._db() as db:
            rows = db.execute("SELECT path FROM instances WHERE study_uid = ? ORDER BY path",
                              (study_uid,)).fetchall()
        return [Path(r[0]) for r in rows]

    def status(self) -> dict[str, Any]:
        """Studies by state (keys are hashes, not UIDs) and the outbox."""
        from medvision.pacs.status import read_status

        return read_status(self.workdir)
