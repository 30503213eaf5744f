"""The DICOMweb/FHIR pieces of the bridge without a server: settings, the watcher's durable
bookkeeping, the STOW-RS endpoint (Starlette's test client over the real storage path), the
FHIR transaction and the HTTP error mapping."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from starlette.testclient import TestClient

from medvision.errors import ConfigError, DeliveryError, PacsError
from medvision.pacs.bridge import Bridge
from medvision.pacs.config import load_bridge_config
from medvision.pacs.status import read_status
from medvision.pacs.store import BridgeStore, ResultObject
from medvision.pacs.stow import StowServer, split_multipart
from medvision.pacs.web import _http_error, fhir_transaction

from conftest import chest_radiograph

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _settings(tmp_path: Path, **changes: object) -> Path:
    settings = yaml.safe_load((EXAMPLES / "dicomweb.yaml").read_text())
    settings.update(changes)
    path = tmp_path / f"bridge-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_the_example_watches_orthanc_and_sends_back(tmp_path: Path) -> None:
    config = load_bridge_config(EXAMPLES / "dicomweb.yaml")
    assert config.port is None and config.destination is None
    assert config.sources[0].dicomweb.url == "http://127.0.0.1:8042/dicom-web/"
    assert config.destination_for("orthanc") == "orthanc"
    assert config.endpoint("orthanc") == config.sources[0].dicomweb
    assert [r.modalities for r in config.routes] == [("CR", "DX"), ("MR",)]


@pytest.mark.parametrize(("changes", "message"), [
    ({"port": 11112}, "needs a destination"),
    ({"stow": {"port": 8080, "senders": [{"name": "ris", "token_env": "T"}]}},
     "STOW-RS listener needs a destination"),
    ({"sources": [{"name": "stow", "dicomweb": {"url": "http://x/"}}]}, "reserved"),
    ({"sources": [{"name": "a", "dicomweb": {"url": "http://x/"}},
                  {"name": "a", "dicomweb": {"url": "http://y/"}}]}, "used twice"),
    ({"sources": [{"name": "a", "dicomweb": {"url": "http://x/", "username": "u"}}]},
     "password_env"),
    ({"sources": [{"name": "a", "dicomweb": {"url": "ftp://x/"}}]}, "url"),
    ({"sources": [{"name": "a", "results": "destination", "dicomweb": {"url": "http://x/"}}]},
     "not set"),
    ({"stow": {"port": 8080, "senders": [{"name": "ris"}]},
      "destination": {"url": "http://x/"}}, "exactly one of token_env"),
])
def test_settings_that_cannot_work_are_refused(tmp_path: Path, changes: dict,
                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_bridge_config(_settings(tmp_path, **changes))


def test_a_credential_missing_from_the_environment_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medvision.pacs.web import session_for

    monkeypatch.delenv("MV_TEST_TOKEN", raising=False)
    config = load_bridge_config(_settings(tmp_path, sources=[
        {"name": "a", "dicomweb": {"url": "https://x/", "token_env": "MV_TEST_TOKEN",
                                   "ca_bundle": "/etc/ssl/ca.pem"}}]))
    with pytest.raises(ConfigError, match="MV_TEST_TOKEN"):
        session_for(config.sources[0].dicomweb)
    monkeypatch.setenv("MV_TEST_TOKEN", "abc")
    session = session_for(config.sources[0].dicomweb)
    assert session.headers["Authorization"] == "Bearer abc"
    assert session.verify == "/etc/ssl/ca.pem"


def test_a_retrieved_study_is_queued_once_and_only_when_complete(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "w")
    for n in range(2):
        store.store_instance(study_uid="1.2", sop_uid=f"1.2.{n}", data=b"DICM", calling_ae="pacs",
                             source="pacs", hold=True)
    assert store.claim_ready(0) is None  # still retrieving: not analysed half-way
    assert store.remote_study("pacs", "1.2")[0] is None  # nothing recorded: a restart re-fetches
    assert store.release_retrieved("pacs", "1.2", "2|CR", {"1.2.9": 2})
    done, pending, _, series = store.remote_study("pacs", "1.2")
    assert done == pending == "2|CR" and series == {"1.2.9": 2}
    job = store.claim_ready(3600)  # complete: no quiet period to wait for
    assert job is not None and job.source == "pacs" and job.instances == 2
    store.finish_analysis("1.2", [ResultObject("9.9", tmp_path / "sr.dcm", "SR", "pacs",
                                               "9.8")], analysis=job.analysis)
    assert store.own_series() == {"9.8"}
    # the same instances again (a poll after a crash): nothing new, nothing re-queued
    store.store_instance(study_uid="1.2", sop_uid="1.2.0", data=b"DICM", calling_ae="pacs",
                         source="pacs", hold=True)
    assert not store.release_retrieved("pacs", "1.2", "3|CR,SR", {"1.2.9": 2})
    assert store.claim_ready(0) is None
    assert store.due_outbox()[0].destination == "pacs"


def test_status_lists_sources_and_destinations_with_queues(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "w")
    store.register_endpoints([("dimse", "source", "DIMSE"), ("pacs", "source", "DICOMweb"),
                              ("pacs", "destination", "STOW-RS"), ("fhir", "destination", "F")])
    store.store_instance(study_uid="1.2", sop_uid="1.2.1", data=b"DICM", calling_ae="pacs",
                         source="pacs", hold=True)
    store.endpoint_result("pacs")
    store.endpoint_result("fhir", "HTTP 503", role="destination")
    store.finish_analysis("1.2", [ResultObject("f:1", tmp_path / "f.json", "FHIR", "fhir")])
    status = {(e["role"], e["name"]): e for e in read_status(tmp_path / "w")["endpoints"]}
    assert status[("source", "pacs")]["queue"] == 1 and status[("source", "pacs")]["last_success"]
    assert status[("source", "dimse")]["queue"] == 0
    assert status[("destination", "fhir")]["queue"] == 1
    assert status[("destination", "fhir")]["last_error"] == "HTTP 503"
    store.register_endpoints([("pacs", "source", "DICOMweb")])  # configuration changed
    assert [e["name"] for e in read_status(tmp_path / "w")["endpoints"]] == ["pacs"]


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + f"\r\nContent-Type: {kind}\r\n\r\n".encode()
                    + data + b"\r\n" for kind, data in parts) + b"--" + boundary.encode() + b"--"
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def test_multipart_parts_come_back_byte_for_byte() -> None:
    import os

    parts = [("application/dicom", os.urandom(4000) + b"\r\n--not-the-boundary\r\n"),
             ("application/dicom", b"\r\n\r\n"), ("application/json", b"{}")]
    body, content_type = _multipart(parts)
    assert split_multipart(content_type, body) == parts
    with pytest.raises(ValueError, match="boundary"):
        split_multipart("application/dicom", body)


@pytest.fixture
def stow(tmp_path: Path) -> tuple[TestClient, Bridge]:
    token_hash = hashlib.sha256(b"hashed-token").hexdigest()
    config = load_bridge_config(_settings(
        tmp_path, sources=[], destination={"url": "http://127.0.0.1:9/dicom-web/"},
        stow={"port": 8080, "max_request_mb": 10,
              "senders": [{"name": "lab", "token_sha256": token_hash}]}))
    bridge = Bridge(config, tmp_path / "w")
    assert config.stow is not None
    return TestClient(StowServer(config.stow, bridge._on_stow).app()), bridge


def test_stow_endpoint_answers_like_a_dicomweb_server(stow: tuple[TestClient, Bridge],
                                                      tmp_path: Path) -> None:
    client, bridge = stow
    chest, study = chest_radiograph(tmp_path / "c")
    auth = {"Authorization": "Bearer hashed-token"}
    body, content_type = _multipart([("application/dicom", chest.read_bytes())])
    assert client.post("/studies", content=body, headers={"Content-Type": content_type}
                       ).status_code == 401
    assert client.post("/studies", content=b"x", headers={**auth, "Content-Type": "application/dicom"}
                       ).status_code == 415
    assert client.post("/studies", content=b"x" * (11 << 20),
                       headers={**auth, "Content-Type": content_type}).status_code == 413
    # an instance posted to another study's URL: refused, nothing stored
    answer = client.post("/studies/1.2.3", content=body, headers={**auth, "Content-Type": content_type})
    assert answer.status_code == 409
    failed = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert failed[0].FailureReason == 0x0110
    assert not list((tmp_path / "w" / "spool").rglob("*.dcm"))
    # garbage and a non-DICOM part beside a good one: 202, the good one stored
    body, content_type = _multipart([("application/dicom", b"\x00" * 300),
                                     ("application/json", b"{}"),
                                     ("application/dicom", chest.read_bytes())])
    answer = client.post(f"/studies/{study}", content=body,
                         headers={**auth, "Content-Type": content_type})
    assert answer.status_code == 202
    response = pydicom.Dataset.from_json(answer.json())
    assert len(response.ReferencedSOPSequence) == 1 and len(response.FailedSOPSequence) == 2
    assert all(i.FailureReason == 0xC000 for i in response.FailedSOPSequence)
    status = read_status(tmp_path / "w")
    assert status["studies"][0]["source"] == "stow" and status["studies"][0]["calling_ae"] == "lab"
    # the same instance again: 200, stored once
    body, content_type = _multipart([("application/dicom", chest.read_bytes())])
    assert client.post("/studies", content=body, headers={**auth, "Content-Type": content_type}
                       ).status_code == 200
    assert len(list((tmp_path / "w" / "spool").rglob("*.dcm"))) == 1


def test_fhir_goes_as_an_idempotent_transaction() -> None:
    bundle = {"resourceType": "Bundle", "id": "b1", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Device", "id": "d1"}}]}
    transaction = fhir_transaction(bundle)
    assert transaction["type"] == "transaction"
    assert transaction["entry"][0]["request"] == {"method": "PUT", "url": "Device/d1"}


@pytest.mark.parametrize(("code", "kind", "permanent"), [
    (401, DeliveryError, False), (403, DeliveryError, False), (400, DeliveryError, True),
    (409, DeliveryError, True), (429, DeliveryError, False), (503, DeliveryError, False)])
def test_http_answers_map_to_retry_or_give_up(code: int, kind: type, permanent: bool) -> None:
    response = requests.Response()
    response.status_code = code
    error = _http_error("STOW-RS", requests.HTTPError(response=response))
    assert type(error) is kind and error.permanent is permanent
    assert f"HTTP {code}" in str(error)


def test_no_answer_is_an_outage_not_a_refusal() -> None:
    error = _http_error("QIDO-RS", requests.ConnectionError("refused"))
    assert type(error) is PacsError and "no answer" in str(error)


def test_stow_over_tls_with_a_token_and_a_private_ca(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Our STOW-RS client (the sender of results) against our STOW-RS listener, both over TLS:
    the client trusts the server only through the configured CA bundle."""

    from medvision.pacs.config import DicomWebEndpoint
    from medvision.pacs.web import stow_deliver

    from conftest import tls_certificates
    from orthanc_peer import free_port

    certificates = tls_certificates(tmp_path / "pki")
    port = free_port()
    config = load_bridge_config(_settings(
        tmp_path, sources=[], destination={"url": "http://127.0.0.1:9/dicom-web/"},
        stow={"port": port, "senders": [{"name": "peer", "token_env": "MV_STOW_TOKEN"}],
              "tls": {"certificate": str(certificates["server.crt"]),
                      "key": str(certificates["server.key"])}}))
    monkeypatch.setenv("MV_STOW_TOKEN", "tls-token")
    bridge = Bridge(config, tmp_path / "w")
    assert config.stow is not None
    server = StowServer(config.stow, bridge._on_stow)
    server.start()
    try:
        chest, _ = chest_radiograph(tmp_path / "c")
        endpoint = DicomWebEndpoint(url=f"https://127.0.0.1:{port}", token_env="MV_STOW_TOKEN",
                                    ca_bundle=certificates["ca.crt"])
        assert stow_deliver(endpoint, chest) is None
        assert len(list((tmp_path / "w" / "spool").rglob("*.dcm"))) == 1
        with pytest.raises(PacsError, match="no answer"):  # the system CAs do not know ours
            stow_deliver(endpoint.model_copy(update={"ca_bundle": None}), chest)
        monkeypatch.setenv("MV_STOW_TOKEN", "wrong")
        with pytest.raises(DeliveryError, match="HTTP 401: the server refused our credentials"):
            stow_deliver(endpoint, chest)
    finally:
        server.stop()
