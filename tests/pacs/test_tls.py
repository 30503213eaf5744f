"""DICOM TLS both ways against a real Orthanc 1.10 with DicomTlsEnabled: Orthanc sends a study
to the bridge's TLS listener (Orthanc's certificate checked against the bridge's CA), the
bridge sends its results to Orthanc's TLS port (Orthanc's certificate checked, the bridge's
client certificate required by Orthanc). A certificate from another CA is refused both ways,
and the bridge logs the failed handshake."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_peers import BridgeProcess, small_radiograph

from medvision.errors import DeliveryError
from medvision.pacs.bridge import Bridge
from medvision.pacs.config import BridgeConfig, Peer, PeerTLS, Route, TLSConfig
from medvision.pacs.scu import deliver

from conftest import tls_certificates, wait_until
from orthanc_peer import Orthanc, free_port

pytestmark = pytest.mark.integration


class TlsSetup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = tls_certificates(root / "certs")
        self.other = tls_certificates(root / "other-ca")
        self.bridge_port, self.strict_port = free_port(), free_port()
        c = self.certs
        self.orthanc = Orthanc(
            root / "orthanc", DicomTlsEnabled=True, DicomTlsCertificate=str(c["server.crt"]),
            DicomTlsPrivateKey=str(c["server.key"]),
            DicomTlsTrustedCertificates=str(c["ca.crt"]),
            DicomTlsRemoteCertificateRequired=True,
            DicomModalities={
                "bridge": {"AET": "MEDVISION", "Host": "127.0.0.1", "Port": self.bridge_port,
                           "UseDicomTls": True},
                "strict": {"AET": "MEDVISION", "Host": "127.0.0.1", "Port": self.strict_port,
                           "UseDicomTls": True}})

    def peer(self, *, ca: Path | None = None) -> Peer:
        c = self.certs
        return Peer(ae_title="ORTHANC", port=self.orthanc.dicom,
                    tls=PeerTLS(ca=ca or c["ca.crt"], certificate=c["client.crt"],
                                key=c["client.key"]))

    def upload(self, path: Path) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.orthanc.http}/instances",
                                         data=path.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return str(json.loads(answer.read())["ID"])

    def send_from_orthanc(self, modality: str, instance: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.orthanc.http}/modalities/{modality}/store",
            data=json.dumps({"Resources": [instance], "Timeout": 30}).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    setup = TlsSetup(tmp_path_factory.mktemp("tls"))
    yield setup
    setup.orthanc.stop()


def test_orthanc_to_bridge_and_back_over_dicom_tls(tls: TlsSetup, tmp_path: Path) -> None:
    c = tls.certs
    peer = tls.peer()
    settings = {
        "ae_title": "MEDVISION", "port": tls.bridge_port, "allowed_calling_aes": ["ORTHANC"],
        "quiet_period_s": 1, "poll_interval_s": 0.2, "workers": 1,
        "tls": {"certificate": str(c["client.crt"]), "key": str(c["client.key"]),
                "ca": str(c["ca.crt"])},
        "destination": json.loads(peer.model_dump_json()),
        "routes": [{"pipeline": "chest-xray-pneumonia", "modalities": ["CR"]}]}
    bridge = BridgeProcess(tmp_path, settings)
    bridge.start()
    try:
        wait_until(lambda: "listening as MEDVISION" in bridge.log_text(), 120, "no bridge")
        assert "(TLS)" in bridge.log_text()
        path = tmp_path / "cr.dcm"
        ds = small_radiograph(path)
        assert tls.send_from_orthanc("bridge", tls.upload(path)) == 200
        study = str(ds.StudyInstanceUID)
        wait_until(lambda: "SR" in tls.orthanc.modalities(study), 300,
                   "no SR came back over TLS")
    finally:
        bridge.stop()


def test_a_certificate_from_another_ca_is_refused_both_ways(tls: TlsSetup, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    # the bridge towards Orthanc: Orthanc's certificate is not signed by the configured CA
    path = tmp_path / "cr.dcm"
    small_radiograph(path)
    with pytest.raises(DeliveryError, match="no TLS association"):
        deliver(tls.peer(ca=tls.other["ca.crt"]), path, calling_ae="MEDVISION")
    # the control: the right CA delivers
    assert deliver(tls.peer(), path, calling_ae="MEDVISION").status == 0x0000
    # Orthanc towards a bridge that trusts only another CA: refused, and logged
    c = tls.certs
    config = BridgeConfig(
        ae_title="MEDVISION", port=tls.strict_port, allowed_calling_aes=("ORTHANC",),
        quiet_period_s=3600, tls=TLSConfig(certificate=c["client.crt"], key=c["client.key"],
                                           ca=tls.other["ca.crt"]),
        destination=tls.peer(), routes=(Route(pipeline="chest-xray-pneumonia"),))
    bridge = Bridge(config, tmp_path / "strict")
    bridge.start()
    try:
        other = tmp_path / "other.dcm"
        small_radiograph(other)
        with caplog.at_level(logging.WARNING, logger="medvision"):
            assert tls.send_from_orthanc("strict", tls.upload(other)) != 200
            deadline = time.monotonic() + 10
            while "TLS handshake with 127.0.0.1 failed" not in caplog.text and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
        assert "TLS handshake with 127.0.0.1 failed" in caplog.text
        assert not list(bridge.store.spool.rglob("*.dcm"))
    finally:
        bridge.stop()
