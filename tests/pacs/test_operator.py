"""Operator commands and the STOW-RS listener's edges, against real peers: ``pacs send`` and
``pacs query`` against Orthanc; the STOW-RS listener with mutual TLS; a request whose body is
longer than its Content-Length."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from security_peers import MEDVISION, multipart, small_radiograph

from medvision.pacs.bridge import Bridge
from medvision.pacs.config import BridgeConfig, Route, StowListener, StowSender, TLSConfig

from conftest import tls_certificates, wait_until
from orthanc_peer import Orthanc, free_port

pytestmark = pytest.mark.integration
TOKEN = "operator-token"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", DicomAlwaysAllowFind=True)
    yield server
    server.stop()


def test_pacs_send_then_query_finds_the_study(orthanc: Orthanc, tmp_path: Path) -> None:
    path = tmp_path / "cr.dcm"
    ds = small_radiograph(path)
    peer = ["--port", str(orthanc.dicom), "--called-ae", "ORTHANC"]
    sent = subprocess.run([MEDVISION, "pacs", "send", *peer, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert sent.returncode == 0 and "sent 1 of 1" in sent.stdout, sent.stderr
    wait_until(lambda: orthanc.instances_in_study(str(ds.StudyInstanceUID)), 30, "not stored")
    found = subprocess.run([MEDVISION, "pacs", "query", *peer, "--match",
                            f"StudyInstanceUID={ds.StudyInstanceUID}"], capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    (match,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert str(ds.StudyInstanceUID) in json.dumps(match)
    # a file that is not DICOM stops the send before anything goes out, naming the file
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    sent = subprocess.run([MEDVISION, "pacs", "send", *peer, str(path), str(junk)],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 1 and "notes.txt: cannot read for sending" in sent.stderr
    assert "Traceback" not in sent.stderr


@pytest.fixture
def stow_bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Bridge,
                                                                                    dict]]:
    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    certs = tls_certificates(tmp_path / "certs")
    config = BridgeConfig(
        port=None, quiet_period_s=3600,
        destination={"url": "http://127.0.0.1:9/dicom-web/"},
        stow=StowListener(port=free_port(), senders=(StowSender(name="ris",
                                                                token_env="STOW_TOKEN"),),
                          tls=TLSConfig(certificate=certs["server.crt"], key=certs["server.key"],
                                        ca=certs["ca.crt"])),
        routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "bridge")
    bridge.start()
    yield bridge, certs
    bridge.stop()


def test_stow_rs_with_mutual_tls(stow_bridge: tuple[Bridge, dict], tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    bridge, certs = stow_bridge
    assert bridge.config.stow is not None
    url = f"https://127.0.0.1:{bridge.config.stow.port}/studies"
    path = tmp_path / "cr.dcm"
    small_radiograph(path)
    body, content_type = multipart([path])
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    response = requests.post(url, data=body, headers=headers, timeout=60,
                             verify=str(certs["ca.crt"]),
                             cert=(str(certs["client.crt"]), str(certs["client.key"])))
    assert response.status_code == 200, response.text
    # no client certificate: refused in the handshake (TLS 1.3: the server closes after it),
    # and the failed handshake is logged
    with caplog.at_level(logging.WARNING, logger="medvision"):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url, data=body, headers=headers, timeout=60,
                          verify=str(certs["ca.crt"]))
        wait_until(lambda: "STOW-RS: TLS handshake failed" in caplog.text, 10,
                   "the failed handshake was not logged")
    assert len(list(bridge.store.spool.rglob("*.dcm"))) == 1


def test_a_body_longer_than_its_content_length_is_cut_there(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Content-Length says 200 bytes; 1 MB follows. The listener reads 200 bytes, finds no
    complete multipart body (400), stores nothing, and keeps answering."""
    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    config = BridgeConfig(
        port=None, quiet_period_s=3600, destination={"url": "http://127.0.0.1:9/dicom-web/"},
        stow=StowListener(port=free_port(), senders=(StowSender(name="ris",
                                                                token_env="STOW_TOKEN"),)),
        routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "bridge")
    bridge.start()
    try:
        assert bridge.config.stow is not None
        port = bridge.config.stow.port
        path = tmp_path / "cr.dcm"
        small_radiograph(path)
        body, content_type = multipart([path])
        head = (f"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: 200\r\n"
                "Connection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 409), answer[:300]
        assert not list(bridge.store.spool.rglob("*.dcm"))
        # still answering, and a well-formed request still stores
        response = requests.post(f"http://127.0.0.1:{port}/studies", data=body, timeout=60,
                                 headers={"Content-Type": content_type,
                                          "Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert pydicom.Dataset.from_json(response.json()).ReferencedSOPSequence
    finally:
        bridge.stop()
