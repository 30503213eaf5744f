"""The bridge's record never hides a failure, and holds no patient data.

Real peers: dcmtk's storescu sends, a pynetdicom Store SCP receives results, a strict FHIR
stub receives bundles; the bridge runs as ``medvision pacs listen`` in its own process.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from security_peers import MEDVISION, BridgeProcess, small_radiograph

from medvision.audit import AuditLog

from conftest import dcmtk_tool, require, wait_until
from fhir_stub import FhirStub
from orthanc_peer import free_port
from scripted_peer import ScriptedPeer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STORESCU = dcmtk_tool("storescu") or "storescu"
NAME, MRN = "SMITH JOHN", "MRN-778899"


def _settings(destination: int, port: int, **extra: object) -> dict:
    settings = {"ae_title": "MEDVISION", "port": port, "allowed_calling_aes": ["STORESCU"],
                "quiet_period_s": 1, "poll_interval_s": 0.2, "workers": 1,
                "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": destination},
                "routes": [{"pipeline": "chest-xray-pneumonia", "modalities": ["CR", "DX"]}],
                "retry": {"backoff_s": 0.2, "max_backoff_s": 0.5, "max_attempts": 1,
                          "analysis_retry_s": 0, "analysis_max_attempts": 1}}
    settings.update(extra)
    return settings


def _start(bridge: BridgeProcess) -> BridgeProcess:
    bridge.start()
    wait_until(lambda: "listening as MEDVISION" in bridge.log_text(), 120,
               "the bridge did not start")
    return bridge


def _send(port: int, path: Path) -> None:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed")
    result = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "MEDVISION", "127.0.0.1",
                             str(port), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _audit(bridge: BridgeProcess) -> list[dict]:
    return list(AuditLog(bridge.workdir / "audit.sqlite").records())


def _one_study(bridge: BridgeProcess) -> dict:
    code, status = bridge.status()
    (study,) = status["studies"]
    return {**study, "exit": code}


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    running = ScriptedPeer().start()
    yield running
    running.stop()


def test_no_route_is_rejected_visible_audited_and_retried_after_a_fix(
        peer: ScriptedPeer, tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(peer.port, port,
                         routes=[{"pipeline": "chest-xray-pneumonia", "modalities": ["DX"]}])
    bridge = _start(BridgeProcess(tmp_path, settings))
    try:
        path = tmp_path / "in" / "cr.dcm"
        small_radiograph(path)
        _send(port, path)
        wait_until(lambda: bridge.studies() and "rejected" in bridge.studies().values(), 120,
                   "the study was not rejected")
        study = _one_study(bridge)
        assert study["exit"] == 1 and study["error"] == \
            "no route matches the study (modalities CR)"
        text = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(bridge.workdir)],
                              capture_output=True, text=True)
        assert text.returncode == 1 and f"study {study['study']}: rejected" in text.stdout
        assert "bridge running: pid" in text.stdout
        assert f"study {study['study']}: rejected" in bridge.log_text()  # one key everywhere
        records = [r for r in _audit(bridge) if r.get("action") == "analyze"]
        assert records and records[-1]["status"] == "rejected"
    finally:
        bridge.stop()
    # the fix: a route for CR; `pacs retry KEY` analyses it again, and the result goes out
    bridge.config.write_text(yaml.safe_dump(_settings(peer.port, port)))
    bridge = _start(bridge)
    try:
        retry = subprocess.run([MEDVISION, "pacs", "retry", "--workdir", str(bridge.workdir),
                                study["study"]], capture_output=True, text=True)
        assert retry.returncode == 0 and "re-queued 1" in retry.stdout, retry.stdout
        wait_until(lambda: "done" in bridge.studies().values(), 300, "no analysis after retry")
        assert peer.received, "no result reached the destination"
        assert _one_study(bridge)["exit"] == 0
    finally:
        bridge.stop()


def test_an_analysis_that_fails_is_failed_and_audited(peer: ScriptedPeer,
                                                      tmp_path: Path) -> None:
    """A pipeline whose weights file is damaged: the analysis raises, the study ends
    ``failed`` with the reason (not ``done``), in the status and the audit trail."""
    broken = tmp_path / "broken-chest"
    shutil.copytree(REPO / "pipelines" / "chest-xray-pneumonia", broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])
    port = free_port()
    bridge = _start(BridgeProcess(tmp_path, _settings(
        peer.port, port, routes=[{"pipeline": str(broken), "modalities": ["CR"]}])))
    try:
        path = tmp_path / "in" / "cr.dcm"
        small_radiograph(path)
        _send(port, path)
        wait_until(lambda: "failed" in bridge.studies().values(), 180, "the study did not fail")
        study = _one_study(bridge)
        assert study["exit"] == 1 and study["error"]
        assert any(r.get("action") == "analyze" and r.get("status") == "failed"
                   for r in _audit(bridge))
    finally:
        bridge.stop()


def test_a_retry_that_delivers_is_audited_as_delivered(tmp_path: Path) -> None:
    destination, port = free_port(), free_port()
    bridge = _start(BridgeProcess(tmp_path, _settings(destination, port)))
    try:
        path = tmp_path / "in" / "cr.dcm"
        small_radiograph(path)
        _send(port, path)  # the destination is down: one try, then failed
        wait_until(lambda: "failed" in bridge.studies().values(), 300, "delivery did not fail")
        failed = [r for r in _audit(bridge) if r.get("action") == "deliver"]
        assert failed and all(r["status"] == "failed" for r in failed)
        peer = ScriptedPeer(port=destination).start()
        try:
            retry = subprocess.run([MEDVISION, "pacs", "retry", "--workdir",
                                    str(bridge.workdir), "--all"], capture_output=True, text=True)
            assert retry.returncode == 0, retry.stderr
            wait_until(lambda: "done" in bridge.studies().values(), 120, "retry did not deliver")
        finally:
            peer.stop()
        delivered = [r for r in _audit(bridge) if r.get("action") == "deliver"]
        kinds = {r["result"]["kind"] for r in failed}
        for kind in kinds:  # the trail's last word on each result is that it arrived
            last = [r for r in delivered if r["result"]["kind"] == kind][-1]
            assert last["status"] == "ok", last
    finally:
        bridge.stop()


def test_a_study_left_processing_by_a_crash_shows_as_stuck(tmp_path: Path) -> None:
    from medvision.pacs.store import BridgeStore

    store = BridgeStore(tmp_path / "bridge")
    store.store_instance(study_uid="1.2.826.0.1.3680043.8.498.10",
                         sop_uid="1.2.826.0.1.3680043.8.498.11", data=b"x", calling_ae="X")
    store.claim_ready(0)
    ended = subprocess.Popen(["true"])  # a bridge that was killed: its pid runs no more
    ended.wait()
    with sqlite3.connect(store.db_path) as db:
        db.execute("INSERT INTO bridge VALUES (1, ?, ?, 0, 0)",
                   (ended.pid, socket.gethostname()))
    result = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(store.workdir)],
                            capture_output=True, text=True)
    assert "no bridge running" in result.stdout and "did not stop cleanly" in result.stdout
    assert "processing (stuck: no bridge is running" in result.stdout
    status = json.loads(subprocess.run([MEDVISION, "pacs", "status", "--workdir",
                                        str(store.workdir), "--json"],
                                       capture_output=True, text=True).stdout)
    assert status["bridge"]["running"] is False and status["studies"][0]["stuck"] is True


def _files_holding(root: Path, needles: tuple[str, ...], *, skip: tuple[str, ...]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or any(part in skip for part in path.parts) or \
                path.suffix == ".dcm":
            continue
        data = path.read_bytes()
        for needle in needles:
            if needle.encode() in data or needle.encode("utf-16-le") in data:
                found.append(f"{path} holds {needle!r}")
    return found


def test_no_patient_name_or_id_in_logs_status_reports_or_audit(peer: ScriptedPeer,
                                                               tmp_path: Path) -> None:
    """PatientName 'SMITH JOHN' (highdicom warns about it, quoting it) and PatientID
    'MRN-778899' through the bridge (DIMSE in, SR and FHIR out), ``analyze --dicom --fhir`` and
    the audit report: neither string in any log line, status output, report, audit record or
    file the runs wrote. DICOM objects (the spool, the results for the PACS) carry the
    patient by design and are not scanned."""
    fhir = FhirStub()
    try:
        port = free_port()
        bridge = _start(BridgeProcess(tmp_path, _settings(
            peer.port, port, fhir={"server": {"url": fhir.url}})))
        try:
            path = tmp_path / "in" / "cr.dcm"
            small_radiograph(path, PatientName=NAME, PatientID=MRN)
            _send(port, path)
            wait_until(lambda: "done" in bridge.studies().values(), 300, "no result")
            status = subprocess.run([MEDVISION, "pacs", "status", "--workdir",
                                     str(bridge.workdir)], capture_output=True, text=True)
            status_json = subprocess.run([MEDVISION, "pacs", "status", "--json", "--workdir",
                                          str(bridge.workdir)], capture_output=True, text=True)
        finally:
            bridge.stop()
        assert peer.received and fhir.transactions
        out = tmp_path / "analyze"
        analyze = subprocess.run([MEDVISION, "-v", "analyze", str(path), "--pipeline",
                                  "chest-xray-pneumonia", "-o", str(out), "--dicom", "--fhir",
                                  "--audit-log", str(tmp_path / "analyze-audit.sqlite")],
                                 capture_output=True, text=True)
        assert analyze.returncode == 0, analyze.stderr
        assert list(out.glob("*/dicom/sr.dcm")), "no SR: the highdicom path was not taken"
        reports = []
        for log in (bridge.workdir / "audit.sqlite", tmp_path / "analyze-audit.sqlite"):
            for fmt in ("html", "csv", "json"):
                report = tmp_path / f"audit-{log.stem}.{fmt}"
                result = subprocess.run([MEDVISION, "audit", "report", "--audit-log", str(log),
                                         "-o", str(report)], capture_output=True, text=True)
                assert result.returncode == 0, result.stderr
                reports.append(result.stderr)
        texts = {"bridge log": bridge.log_text(), "status": status.stdout + status.stderr,
                 "status --json": status_json.stdout, "analyze stdout": analyze.stdout,
                 "analyze stderr": analyze.stderr, "audit report stderr": "".join(reports),
                 "FHIR sent": json.dumps(fhir.resources)}
        for what, text in texts.items():
            for needle in (NAME, MRN, "SMITH", "778899"):
                assert needle not in text, f"{needle!r} in the {what}"
        assert "a library warned" in analyze.stderr  # the highdicom warning, without its text
        leaks = _files_holding(tmp_path, (NAME, MRN), skip=("in", "spool"))
        assert not leaks, leaks
    finally:
        fhir.stop()
