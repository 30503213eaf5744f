"""The bridge's job store: durability, idempotence, recovery, retries."""

from __future__ import annotations

import time
from pathlib import Path

from medvision.pacs.store import BridgeStore


def _receive(store: BridgeStore, sop: str, study: str = "1.2.3") -> Path:
    return store.store_instance(study_uid=study, sop_uid=sop, data=b"DICM" + sop.encode(),
                                calling_ae="STORESCU")


def test_duplicates_are_idempotent_and_quiet_period_holds(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    first = _receive(store, "1.1")
    again = _receive(store, "1.1")
    assert first == again and first.read_bytes() == b"DICM1.1"
    assert store.status()["studies"][0]["instances"] == 1
    assert store.claim_ready(quiet_period_s=60) is None
    job = store.claim_ready(quiet_period_s=0)
    assert job is not None and job.instances == 1
    assert store.claim_ready(quiet_period_s=0) is None  # already claimed


def test_crash_mid_analysis_is_recovered(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _receive(store, "1.1")
    assert store.claim_ready(quiet_period_s=0) is not None
    reopened = BridgeStore(tmp_path)  # a new process after SIGKILL
    assert reopened.recover() == 1
    job = reopened.claim_ready(quiet_period_s=0)
    assert job is not None and reopened.status()["studies"][0]["attempts"] == 2


def test_outbox_retries_with_backoff_then_completes(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _receive(store, "1.1")
    store.claim_ready(quiet_period_s=0)
    result = tmp_path / "sr.dcm"
    result.write_bytes(b"x")
    store.finish_analysis("1.2.3", [("9.9", result, "SR")])
    store.finish_analysis("1.2.3", [("9.9", result, "SR")])  # a repeat queues nothing new
    assert len(store.due_outbox()) == 1
    store.mark_failed_send("9.9", "refused", backoff_s=60, max_backoff_s=120)
    assert store.due_outbox() == []  # waiting for its next try
    status = store.status()
    assert status["studies"][0]["state"] == "sending"
    assert status["outbox"][0]["attempts"] == 1 and status["outbox"][0]["error"] == "refused"
    store.mark_sent("9.9")
    assert store.status()["studies"][0]["state"] == "done"


def test_late_instance_reopens_a_finished_study(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path)
    _receive(store, "1.1")
    store.claim_ready(quiet_period_s=0)
    store.finish_analysis("1.2.3", [])
    assert store.status()["studies"][0]["state"] == "done"
    time.sleep(0.01)
    _receive(store, "1.2")  # the rest of a study whose sender dropped halfway
    study = store.status()["studies"][0]
    assert study["state"] == "receiving" and study["instances"] == 2
    assert len(store.instance_paths("1.2.3")) == 2
