"""``pacs status``: a bridge work folder's state, read without writing.

It only reads the job database (read-only, or as an immutable file when no writer runs), so
it answers on a full disk: which bridge runs on the folder (pid, heartbeat, alive or not),
every source and destination with its queue and last success and error, every study with its
state (a study left ``processing`` by a crash marked stuck) and every result.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from medvision.errors import PacsError
from medvision.pacs.store import HEARTBEAT_S, BridgeStore, StudyState

__all__ = ["read_status"]


def read_status(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """The work folder's state, read-only: it writes nothing, so it answers on a full disk.

    Raises:
        PacsError: no job database there, or it cannot be read.
    """
    path = Path(workdir) / "jobs.sqlite"
    if not path.is_file():
        raise PacsError(f"{workdir}: no bridge work folder here (no jobs.sqlite)")
    connection = None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        connection.execute("SELECT 1 FROM studies LIMIT 1")
    except sqlite3.Error:
        # A read-only WAL database needs its -shm file; without a writer running (or with
        # no space to create it) read the file as immutable instead.
        if connection is not None:
            connection.close()
        try:
            connection = sqlite3.connect(f"file:{path}?immutable=1", uri=True, timeout=30)
        except sqlite3.Error as e:
            raise PacsError(f"{path}: cannot open the job database ({e})") from e
    try:
        def has(table: str, column: str) -> bool:
            return column in {r[1] for r in connection.execute(f"PRAGMA table_info({table})")}

        note = "note" if has("outbox", "note") else "NULL"
        destination = "destination" if has("outbox", "destination") else "'destination'"
        source = "source" if has("studies", "source") else "'dimse'"
        name = BridgeStore.study_folder_name
        studies = [{"study": name(r[0]), "state": r[1], "instances": r[2], "attempts": r[3],
                    "error": r[4], "calling_ae": r[5], "source": r[6]}
                   for r in connection.execute(f"SELECT study_uid, state, instances, attempts, "
                                               f"error, calling_ae, {source} FROM studies "
                                               f"ORDER BY first_received")]
        outbox = [{"study": name(r[0]), "kind": r[1], "state": r[2], "attempts": r[3],
                   "error": r[4], "note": r[5], "destination": r[6]}
                  for r in connection.execute(f"SELECT study_uid, kind, state, attempts, error, "
                                              f"{note}, {destination} FROM outbox "
                                              f"ORDER BY next_try")]
        endpoints = []
        if connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'endpoints'").fetchone():
            for r in connection.execute("SELECT name, role, detail, last_success, last_error, "
                                        "last_error_at FROM endpoints ORDER BY role, name"):
                if r[1] == "source":
                    queue = sum(1 for s in studies if s["source"] == r[0] and s["state"] in (
                        "retrieving", "receiving", "processing"))
                else:
                    queue = sum(1 for o in outbox if o["destination"] == r[0] and o["state"] in (
                        "pending", "sent_awaiting"))
                endpoints.append({"name": r[0], "role": r[1], "detail": r[2], "queue": queue,
                                  "last_success": _iso(r[3]), "last_error": r[4],
                                  "last_error_at": _iso(r[5])})
        bridge = _bridge_status(connection)
        if not bridge["running"]:
            for study in studies:  # nothing is working on it: left by a crash
                if study["state"] == StudyState.PROCESSING:
                    study["stuck"] = True
    except sqlite3.Error as e:
        raise PacsError(f"{path}: cannot read the job database ({e})") from e
    finally:
        connection.close()
    return {"bridge": bridge, "endpoints": endpoints, "studies": studies, "outbox": outbox}


def _bridge_status(connection: sqlite3.Connection) -> dict[str, Any]:
    """Whether a bridge runs on this work folder: its pid and last heartbeat, and whether
    that process is alive (on this host) and beat recently."""
    import socket

    if not connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'bridge'").fetchone():
        return {"running": False, "pid": None, "heartbeat": None}
    row = connection.execute("SELECT pid, host, started, heartbeat FROM bridge "
                             "WHERE id = 1").fetchone()
    if row is None:
        return {"running": False, "pid": None, "heartbeat": None}
    pid, host, started, beat = int(row[0]), str(row[1]), float(row[2]), float(row[3])
    alive = True
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass  # another user's process: it exists
    fresh = time.time() - beat < 6 * HEARTBEAT_S
    return {"running": alive and fresh, "pid": pid, "host": host, "started": _iso(started),
            "heartbeat": _iso(beat), "alive": alive}


def _iso(seconds: float | None) -> str | None:
    from datetime import UTC, datetime

    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(
        timespec="seconds")
