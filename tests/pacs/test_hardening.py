"""The bridge's network edges, against real peers: rejected associations are logged and
nothing is spooled; the called AE title and an optional peer-network allow-list are checked;
a chunked STOW-RS body stops at the limit while streaming; forged storage commitment reports
mark nothing; configuration errors stop the start with exit 2 and one clear line."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from security_peers import MEDVISION, multipart, small_radiograph

from medvision.pacs.bridge import Bridge
from medvision.pacs.config import BridgeConfig, Peer, Route, StowListener, StowSender
from medvision.pacs.scu import STORAGE_COMMITMENT
from medvision.pacs.store import ResultObject

from conftest import dcmtk_tool, require, wait_until
from orthanc_peer import free_port

pytestmark = pytest.mark.integration

STORESCU = dcmtk_tool("storescu") or "storescu"
TOKEN = "hardening-token"


@pytest.fixture
def bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bridge]:
    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    config = BridgeConfig(
        ae_title="MEDVISION", port=free_port(), allowed_calling_aes=("STORESCU",),
        quiet_period_s=3600, destination=Peer(ae_title="PACS", port=free_port(),
                                             storage_commitment=True),
        stow=StowListener(port=free_port(), max_request_mb=1,
                          senders=(StowSender(name="ris", token_env="STOW_TOKEN"),)),
        routes=(Route(pipeline="chest-xray-pneumonia", modalities=("CR",)),))
    running = Bridge(config, tmp_path / "bridge")
    running.start()
    yield running
    running.stop()


def _storescu(bridge: Bridge, path: Path, *, aet: str = "STORESCU",
              aec: str = "MEDVISION") -> subprocess.CompletedProcess:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed")
    return subprocess.run([STORESCU, "-v", "-aet", aet, "-aec", aec, "127.0.0.1",
                           str(bridge.config.port), str(path)], capture_output=True, text=True,
                          timeout=60)


def _spooled(bridge: Bridge) -> list[Path]:
    return list(bridge.store.spool.rglob("*.dcm"))


@pytest.mark.parametrize(("aet", "aec", "reason"), [
    ("INTRUDER", "MEDVISION", "calling AE title not allowed"),
    ("STORESCU", "SOMEONEELSE", "called AE title is not MEDVISION"),
])
def test_rejected_associations_are_logged_and_nothing_is_spooled(
        bridge: Bridge, tmp_path: Path, caplog: pytest.LogCaptureFixture, aet: str, aec: str,
        reason: str) -> None:
    path = tmp_path / "cr.dcm"
    small_radiograph(path)
    with caplog.at_level(logging.WARNING, logger="medvision"):
        result = _storescu(bridge, path, aet=aet, aec=aec)
        deadline = time.monotonic() + 10
        while "rejected an association" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert result.returncode != 0 and "Association Rejected" in result.stderr, result.stderr
    line = next(r.getMessage() for r in caplog.records
                if "rejected an association" in r.getMessage())
    assert f"calling AE '{aet}'" in line and f"called AE '{aec}'" in line and reason in line
    assert "127.0.0.1" in line
    assert _spooled(bridge) == []


def test_peer_networks_outside_the_allow_list_are_closed(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    config = BridgeConfig(
        port=free_port(), allowed_calling_aes=("STORESCU",), quiet_period_s=3600,
        allowed_peer_networks=("10.0.0.0/8", "192.168.0.0/16"),
        destination=Peer(ae_title="PACS", port=free_port()),
        routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "bridge")
    bridge.start()
    try:
        path = tmp_path / "cr.dcm"
        small_radiograph(path)
        with caplog.at_level(logging.WARNING, logger="medvision"):
            result = _storescu(bridge, path)
            wait_until(lambda: "not in allowed_peer_networks" in caplog.text, 10,
                       "the refused connection was not logged")
        assert result.returncode != 0
        assert "refused a connection from 127.0.0.1: not in allowed_peer_networks" in caplog.text
        assert _spooled(bridge) == []
    finally:
        bridge.stop()


def test_the_empty_calling_ae_list_is_warned_about(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    config = BridgeConfig(port=free_port(), quiet_period_s=3600,
                          destination=Peer(ae_title="PACS", port=free_port()),
                          routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "bridge")
    with caplog.at_level(logging.WARNING, logger="medvision"):
        bridge.start()
    bridge.stop()
    assert "allowed_calling_aes is empty: any calling AE title is accepted" in caplog.text


def test_a_chunked_stow_body_stops_at_the_limit(bridge: Bridge, tmp_path: Path) -> None:
    """1 MB limit, no Content-Length: the listener counts while it reads and answers 413."""
    sent = {"bytes": 0}

    def body() -> Iterator[bytes]:
        chunk = b"\0" * 65536
        for _ in range(20 * 16):  # 20 MB if it were all read
            sent["bytes"] += len(chunk)
            yield chunk

    assert bridge.config.stow is not None
    url = f"http://127.0.0.1:{bridge.config.stow.port}/studies"
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
    try:
        response = requests.post(url, data=body(), headers=headers, timeout=60)
        assert response.status_code == 413
    except requests.ConnectionError:
        pass  # the server answered 413 and closed while the client was still sending
    assert sent["bytes"] < 20 * 2**20
    # the listener still answers: a well-formed request under the limit is stored
    path = tmp_path / "cr.dcm"
    small_radiograph(path)
    data, content_type = multipart([path])
    response = requests.post(url, data=data, timeout=60, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    assert response.status_code == 200, response.text


def _report(port: int, calling: str, transaction: str, sop_uid: str) -> int:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role

    ae = AE(ae_title=calling)
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDVISION",
                         ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)])
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = transaction
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    item.ReferencedSOPInstanceUID = sop_uid
    info.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_event_report(info, 1, STORAGE_COMMITMENT, "1.2.840.10008.1.20.1.1")
    assoc.release()
    return int(status.Status)


def test_forged_storage_commitment_reports_mark_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A result waits for the destination's commitment under transaction T. A report from
    another AE, or from the destination naming another transaction, is refused and changes
    nothing; the destination's report under T commits it."""
    config = BridgeConfig(port=free_port(), quiet_period_s=3600,  # any calling AE associates
                          destination=Peer(ae_title="PACS", port=free_port(),
                                           storage_commitment=True),
                          routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "bridge")
    bridge.start()
    try:
        store = bridge.store
        study, sop = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
        store.store_instance(study_uid=study, sop_uid="1.2.826.0.1.3680043.8.498.3",
                             data=b"x", calling_ae="STORESCU")
        store.claim_ready(0)
        result = tmp_path / "sr.dcm"
        result.write_bytes(b"x")
        store.finish_analysis(study, [ResultObject(sop, result, "SR")])
        store.mark_sent(sop, awaiting_commitment=True)
        transaction = "1.2.826.0.1.3680043.8.498.4"
        store.mark_commitment_requested([sop], transaction)

        def state() -> str:
            return next(o["state"] for o in store.status()["outbox"])

        assert _report(config.port or 0, "EVIL", transaction, sop) == 0x0110
        assert state() == "sent_awaiting"
        assert _report(config.port or 0, "PACS", "1.2.826.0.1.3680043.8.498.999", sop) == 0x0110
        assert state() == "sent_awaiting"
        assert _report(config.port or 0, "PACS", transaction, sop) == 0x0000
        assert state() == "committed"
    finally:
        bridge.stop()


def _listen(tmp_path: Path, settings: dict) -> subprocess.CompletedProcess:
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump(settings))
    return subprocess.run([MEDVISION, "pacs", "listen", "--config", str(config), "--workdir",
                           str(tmp_path / "bridge")], capture_output=True, text=True,
                          timeout=120)


def test_a_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _listen(tmp_path, {"port": port, "destination": {
            "ae_title": "PACS", "port": free_port()}, "routes": [
            {"pipeline": "chest-xray-pneumonia"}]})
    assert result.returncode == 2, result.stderr
    assert f"cannot listen for DIMSE on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_route_to_an_unknown_pipeline_stops_the_start(tmp_path: Path) -> None:
    result = _listen(tmp_path, {"port": free_port(), "destination": {
        "ae_title": "PACS", "port": free_port()}, "routes": [{"pipeline": "chest-xray-pneumonai"}]})
    assert result.returncode == 2, result.stderr
    assert "a route names pipeline 'chest-xray-pneumonai'" in result.stderr
    assert "Traceback" not in result.stderr


def test_retry_of_an_unknown_study_and_a_malformed_query_are_usage_errors(tmp_path: Path) -> None:
    from medvision.pacs.store import BridgeStore

    BridgeStore(tmp_path / "bridge")
    result = subprocess.run([MEDVISION, "pacs", "retry", "--workdir", str(tmp_path / "bridge"),
                             "0123456789abcdef0123"], capture_output=True, text=True)
    assert result.returncode == 2 and "no study '0123456789abcdef0123'" in result.stderr
    result = subprocess.run([MEDVISION, "pacs", "query", "--host", "127.0.0.1", "--port",
                             str(free_port()), "--called-ae", "PACS", "--match", "PatientID"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--match takes KEYWORD=VALUE" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr


def test_a_stow_sender_whose_token_variable_is_unset_stops_the_start(tmp_path: Path) -> None:
    result = _listen(tmp_path, {"port": None, "destination": {
        "url": "http://127.0.0.1:9/dicom-web/"}, "stow": {
        "port": free_port(), "senders": [{"name": "ris", "token_env": "MV_UNSET_TOKEN_VAR"}]},
        "routes": [{"pipeline": "chest-xray-pneumonia"}]})
    assert result.returncode == 2, result.stderr
    assert "MV_UNSET_TOKEN_VAR" in result.stderr and "Traceback" not in result.stderr


def test_a_malformed_peer_network_is_a_configuration_error(tmp_path: Path) -> None:
    result = _listen(tmp_path, {"port": free_port(), "allowed_peer_networks": ["10.0.0.0/33"],
                                "destination": {"ae_title": "PACS", "port": free_port()},
                                "routes": [{"pipeline": "chest-xray-pneumonia"}]})
    assert result.returncode == 2, result.stderr
    assert "allowed_peer_networks" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_tls_certificate_for_the_destination_stops_the_start(tmp_path: Path) -> None:
    result = _listen(tmp_path, {"port": free_port(), "routes": [
        {"pipeline": "chest-xray-pneumonia"}], "destination": {
        "ae_title": "PACS", "port": free_port(),
        "tls": {"ca": str(tmp_path / "missing-ca.crt")}}})
    assert result.returncode == 2, result.stderr
    assert "DICOM TLS: cannot load the CA" in result.stderr and "Traceback" not in result.stderr
