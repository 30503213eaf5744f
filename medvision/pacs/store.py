"""The bridge's durable state: a spool of received instances and a SQLite job table.

An instance is acknowledged only after its file is on disk (temporary file, fsync, atomic
rename, fsync of the folder) and its row is committed. Study states::

    receiving --(quiet period)--> processing --(results written)--> sending --> done
                                       +--(error)--> failed (kept with the reason)
        ^                              |                                ^
        +-------- new instance --------+---- restart (crash) ----------+

A study caught in ``processing`` by a crash goes back to ``receiving`` on start and is
analysed again; results carry UIDs derived from their inputs, so a second run produces the same
objects and the outbox (one row per result SOP Instance UID) sends each once.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.errors import PacsError

__all__ = ["BridgeStore", "OutboxItem", "StudyJob"]

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
"""


@dataclass(frozen=True)
class StudyJob:
    """A study the worker should analyse."""

    study_uid: str
    folder: Path
    calling_ae: str
    instances: int


@dataclass(frozen=True)
class OutboxItem:
    """A result object waiting to be sent."""

    sop_uid: str
    study_uid: str
    path: Path
    kind: str
    attempts: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BridgeStore:
    """Spool folder and job database under one working directory."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.spool = self.workdir / "spool"
        self.results = self.workdir / "results"
        self.db_path = self.workdir / "jobs.sqlite"
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            self.results.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.executescript(_SCHEMA)
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

    def store_instance(self, *, study_uid: str, sop_uid: str, data: bytes,
                       calling_ae: str) -> Path:
        """Write one received instance durably and record it (idempotent for repeats)."""
        folder = self.spool / self.study_folder_name(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"
        target = folder / name
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            new = db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?)",
                             (sop_uid, study_uid, str(target), now)).rowcount
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO studies (study_uid, folder, calling_ae, first_received, "
                           "last_received, instances, state, updated) VALUES "
                           "(?, ?, ?, ?, ?, 1, 'receiving', ?)",
                           (study_uid, str(folder), calling_ae, now, now, now))
            else:
                db.execute("UPDATE studies SET last_received = ?, instances = instances + ?, "
                           "state = CASE WHEN ? THEN 'receiving' ELSE state END, updated = ? "
                           "WHERE study_uid = ?", (now, new, bool(new), now, study_uid))
            db.execute("COMMIT")
        return target

    def recover(self) -> int:
        """After a crash: studies caught mid-analysis are analysed again. Returns how many."""
        with self._db() as db:
            return db.execute("UPDATE studies SET state = 'receiving', updated = ? "
                              "WHERE state = 'processing'", (time.time(),)).rowcount

    def claim_ready(self, quiet_period_s: float) -> StudyJob | None:
        """The oldest study quiet for ``quiet_period_s``, moved to ``processing``."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT study_uid, folder, calling_ae, instances FROM studies "
                             "WHERE state = 'receiving' AND last_received <= ? "
                             "ORDER BY last_received LIMIT 1",
                             (time.time() - quiet_period_s,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE studies SET state = 'processing', attempts = attempts + 1, "
                       "updated = ? WHERE study_uid = ?", (time.time(), row[0]))
            db.execute("COMMIT")
        return StudyJob(study_uid=row[0], folder=Path(row[1]), calling_ae=row[2],
                        instances=row[3])

    def finish_analysis(self, study_uid: str, outputs: list[tuple[str, Path, str]], *,
                        error: str | None = None, failed: bool = False) -> None:
        """Queue the results (sop_uid, path, kind) and move the study on, in one transaction.

        A study that received new instances meanwhile stays ``receiving`` (it is analysed
        again with everything).
        """
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for sop_uid, path, kind in outputs:
                db.execute("INSERT INTO outbox (sop_uid, study_uid, path, kind, state, next_try) "
                           "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT(sop_uid) DO NOTHING",
                           (sop_uid, study_uid, str(path), kind, now))
            state = "failed" if failed else "sending" if outputs else "done"
            db.execute("UPDATE studies SET state = ?, error = ?, updated = ? "
                       "WHERE study_uid = ? AND state = 'processing'",
                       (state, error, now, study_uid))
            db.execute("COMMIT")

    def due_outbox(self) -> list[OutboxItem]:
        """Results whose next try is due."""
        with self._db() as db:
            rows = db.execute("SELECT sop_uid, study_uid, path, kind, attempts FROM outbox "
                              "WHERE state = 'pending' AND next_try <= ? ORDER BY next_try",
                              (time.time(),)).fetchall()
        return [OutboxItem(r[0], r[1], Path(r[2]), r[3], r[4]) for r in rows]

    def mark_sent(self, sop_uid: str) -> None:
        """One result delivered; a study whose results are all delivered is done."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            study = db.execute("UPDATE outbox SET state = 'sent', error = NULL WHERE sop_uid = ? "
                               "RETURNING study_uid", (sop_uid,)).fetchone()
            if study is not None:
                left = db.execute("SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND "
                                  "state != 'sent'", (study[0],)).fetchone()[0]
                if left == 0:
                    db.execute("UPDATE studies SET state = 'done', updated = ? WHERE "
                               "study_uid = ? AND state = 'sending'", (time.time(), study[0]))
            db.execute("COMMIT")

    def mark_failed_send(self, sop_uid: str, error: str, *, backoff_s: float,
                         max_backoff_s: float) -> None:
        """A send failed: try again later (exponential backoff, capped); stays queued."""
        with self._db() as db:
            attempts = db.execute("SELECT attempts FROM outbox WHERE sop_uid = ?",
                                  (sop_uid,)).fetchone()[0] + 1
            delay = min(max_backoff_s, backoff_s * 2 ** (attempts - 1))
            db.execute("UPDATE outbox SET attempts = ?, next_try = ?, error = ? WHERE sop_uid = ?",
                       (attempts, time.time() + delay, error, sop_uid))

    def instance_paths(self, study_uid: str) -> list[Path]:
        """Spool files of a study."""
        with self._db() as db:
            rows = db.execute("SELECT path FROM instances WHERE study_uid = ? ORDER BY path",
                              (study_uid,)).fetchall()
        return [Path(r[0]) for r in rows]

    def status(self) -> dict[str, Any]:
        """Studies by state (keys are hashes, not UIDs) and the outbox."""
        with self._db() as db:
            studies = [{"study": self.study_folder_name(r[0]), "state": r[1], "instances": r[2],
                        "attempts": r[3], "error": r[4], "calling_ae": r[5]}
                       for r in db.execute("SELECT study_uid, state, instances, attempts, error, "
                                           "calling_ae FROM studies ORDER BY first_received")]
            outbox = [{"study": self.study_folder_name(r[0]), "kind": r[1], "state": r[2],
                       "attempts": r[3], "error": r[4]}
                      for r in db.execute("SELECT study_uid, kind, state, attempts, error "
                                          "FROM outbox ORDER BY next_try")]
        return {"studies": studies, "outbox": outbox}
