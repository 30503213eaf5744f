"""The bridge's job store: durability, idempotence, recovery, retries, final states."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from medvision.errors import PacsError
from medvision.pacs.status import read_status
from medvision.pacs.store import BridgeStore, ResultObject, backoff_delay

from conftest import wait_until


def _receive(store: BridgeStore, sop: str, study: str = "1.2.3") -> Path:
    return store.store_instance(study_uid=study, sop_uid=sop, data=b"DICM" + sop.encode(),
                                calling_ae="STORESCU")


def _analysed(store: BridgeStore, tmp_path: Path, sop: str = "9.9",
              name: str = "sr.dcm") -> Path:
    _receive(store, "1.1")
    job = store.claim_ready(quiet_period_s=0)
    assert job is not None
    result = tmp_path / name
    result.write_bytes(b"x")
    assert store.finish_analysis("1.2.3", [ResultObject(sop, result, "SR")],
                                 analysis=job.analysis) == "sending"
    return result


def test_duplicates_are_idempotent_and_quiet_period_holds(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    first = _receive(store, "1.1")
    again = _receive(store, "1.1")
    assert first == again and first.read_bytes() == b"DICM1.1"
    assert store.status()["studies"][0]["instances"] == 1
    assert store.claim_ready(quiet_period_s=60) is None
    job = store.claim_ready(quiet_period_s=0)
    assert job is not None and job.instances == 1 and job.analysis == 1
    assert store.claim_ready(quiet_period_s=0) is None  # already claimed


def test_the_same_instance_on_many_threads_at_once_is_stored_once(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(20):
                _receive(store, "1.1")
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.status()["studies"][0]["instances"] == 1
    assert [p.name for p in (tmp_path / "spool").rglob("*") if p.is_file()] == [
        _receive(store, "1.1").name]  # one file, no temporary files left


def test_crash_mid_analysis_is_recovered_and_temp_files_cleaned(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    path = _receive(store, "1.1")
    (path.parent / f".{path.name}.123.456.abcd.tmp").write_bytes(b"half")
    assert store.claim_ready(quiet_period_s=0) is not None
    reopened = BridgeStore(tmp_path)  # a new process after SIGKILL
    assert reopened.recover() == 1
    assert reopened.clean_temporary_files() == 1
    job = reopened.claim_ready(quiet_period_s=0)
    assert job is not None and job.analysis == 2
    assert reopened.status()["studies"][0]["attempts"] == 2


def test_failed_analysis_is_retried_later_then_failed(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _receive(store, "1.1")
    assert store.claim_ready(quiet_period_s=0) is not None
    assert store.fail_analysis("1.2.3", "OSError: no space", retry_in_s=2.0,
                               max_attempts=2) == "receiving"
    assert store.claim_ready(quiet_period_s=0) is None  # waits for its retry delay
    claimed: list[object] = []
    # ready once the delay has passed (however busy the machine): wait on that, not a clock
    wait_until(lambda: claimed.append(store.claim_ready(quiet_period_s=0)) or claimed[-1],
               10, "the study never became ready again after its retry delay", poll=0.05)
    assert store.fail_analysis("1.2.3", "OSError: no space", retry_in_s=0.2,
                               max_attempts=2) == "failed"
    study = store.status()["studies"][0]
    assert study["state"] == "failed" and "no space" in study["error"]
    assert store.retry(study["study"]) == 1
    assert store.status()["studies"][0]["state"] == "receiving"


def test_outbox_backoff_max_attempts_failed_then_retry(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _analysed(store, tmp_path)
    assert len(store.due_outbox()) == 1
    assert store.mark_failed_send("9.9", "0xA700", max_attempts=3) == "pending"
    assert store.due_outbox(backoff_s=60, max_backoff_s=120) == []  # waiting
    assert len(store.due_outbox(backoff_s=0.001, max_backoff_s=0.001)) == 1  # new settings
    assert store.mark_failed_send("9.9", "0xA700", max_attempts=3) == "pending"
    assert store.mark_failed_send("9.9", "0xA700 again", max_attempts=3) == "failed"
    status = store.status()
    assert status["outbox"][0]["state"] == "failed" and status["outbox"][0]["attempts"] == 3
    assert status["studies"][0]["state"] == "failed"
    assert "0xA700 again" in status["studies"][0]["error"]
    assert store.due_outbox(backoff_s=0.001, max_backoff_s=0.001) == []
    assert store.retry() == 1
    assert store.status()["studies"][0]["state"] == "sending"
    assert len(store.due_outbox()) == 1
    assert store.mark_sent("9.9", note="Warning status 0xB000") == "done"
    assert store.status()["outbox"][0]["note"] == "Warning status 0xB000"


def test_permanent_refusal_fails_at_once(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _analysed(store, tmp_path)
    assert store.mark_failed_send("9.9", "no SR", max_attempts=8, permanent=True) == "failed"
    assert store.status()["studies"][0]["state"] == "failed"


def test_reanalysis_with_identical_results_does_not_hang_in_sending(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    result = _analysed(store, tmp_path)
    store.mark_sent("9.9")
    assert store.retry() == 0
    _receive(store, "1.1")  # a repeat: nothing new, the study stays done
    assert store.status()["studies"][0]["state"] == "done"
    _receive(store, "1.2")  # new instance: analysed again; same result object UID
    job = store.claim_ready(quiet_period_s=0)
    assert job is not None and job.analysis == 2
    assert store.finish_analysis("1.2.3", [ResultObject("9.9", result, "SR")],
                                 analysis=2) == "done"
    assert store.status()["studies"][0]["state"] == "done"


def test_backoff_doubles_and_is_capped() -> None:
    assert backoff_delay(0, backoff_s=2, max_backoff_s=60) == 0
    assert [backoff_delay(n, backoff_s=2, max_backoff_s=60) for n in (1, 2, 3, 6)] == \
        [2, 4, 8, 60]


def test_status_reads_without_writing(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "work")
    _receive(store, "1.1")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*") if p.is_file()}
    status = read_status(tmp_path / "work")
    assert status["studies"][0]["instances"] == 1
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before
    with pytest.raises(PacsError, match="no bridge work folder"):
        read_status(tmp_path / "elsewhere")


def test_old_databases_are_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.executescript("""
    CREATE TABLE studies (study_uid TEXT PRIMARY KEY, folder TEXT NOT NULL, calling_ae TEXT
      NOT NULL, first_received REAL NOT NULL, last_received REAL NOT NULL, instances INTEGER
      NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
      updated REAL NOT NULL);
    CREATE TABLE outbox (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, path TEXT NOT NULL,
      kind TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
      next_try REAL NOT NULL, error TEXT);
    INSERT INTO studies VALUES ('1.2.3', 'f', 'AE', 0, 0, 1, 'sending', 1, NULL, 0);
    INSERT INTO outbox VALUES ('9.9', '1.2.3', 'sr.dcm', 'SR', 'pending', 2, 0, 'refused');
    """)
    db.close()
    store = BridgeStore(tmp_path)
    assert len(store.due_outbox(backoff_s=0.001, max_backoff_s=0.001)) == 1
    assert store.mark_sent("9.9") == "done"
