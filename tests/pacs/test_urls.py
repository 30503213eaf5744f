"""URLs made from data stay under the configured base, before any credentials leave: the
builder, the check, and the bridge's HTTP session against a capture server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from capture_server import CaptureServer

from medvision.errors import DeliveryError
from medvision.pacs.config import DicomWebEndpoint, FhirServer
from medvision.pacs.urls import UnsafeUrlError, check_under, url_under
from medvision.pacs.web import session_for, stow_deliver

from conftest import pydicom_test_files

BASE = "http://127.0.0.1:8042/dicom-web/"


@pytest.mark.parametrize("segments", [("studies", "1.2.3"), ("studies", "1.2.3", "series", "4")])
def test_built_urls_stay_under_the_base(segments: tuple[str, ...]) -> None:
    url = url_under(BASE, *segments)
    assert url == BASE + "/".join(segments)
    check_under(BASE, url)


@pytest.mark.parametrize("segment", ["..", ".", "", "../../tools/shutdown", "a/../../b",
                                     "%2e%2e", "x\\..\\y"])
def test_a_segment_is_one_segment(segment: str) -> None:
    try:
        url = url_under(BASE, "studies", segment)
    except UnsafeUrlError:
        return
    # what was accepted was encoded into a single segment below the base
    assert url.startswith(BASE + "studies/") and "/" not in url[len(BASE + "studies/"):]
    assert "%2F" in url or "/" not in segment


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8042/tools/shutdown",
    "http://127.0.0.1:8042/dicom-web/studies/../../tools/shutdown",
    "http://127.0.0.1:8042/dicom-web/studies/%2e%2e/%2E%2E/tools/shutdown",
    "http://127.0.0.1:8042/dicom-web/studies/..%2F..%2Ftools%2Fshutdown",
    "http://127.0.0.1:8042/dicom-webX/studies",
    "http://127.0.0.1:8043/dicom-web/studies",
    "https://127.0.0.1:8042/dicom-web/studies",
    "http://evil.example/dicom-web/studies",
    "http://127.0.0.1:8042/dicom-web/studies/1.2%00",
])
def test_urls_leaving_the_base_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUrlError):
        check_under(BASE, url)


def test_the_base_itself_and_default_ports() -> None:
    check_under(BASE, "http://127.0.0.1:8042/dicom-web")
    check_under("https://pacs.example/dicom-web", "https://PACS.example:443/dicom-web/studies")
    check_under("http://h/", "http://h/anything/below")


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    yield server
    server.stop()


def test_a_redirect_out_of_the_base_is_not_followed_with_credentials(
        capture: CaptureServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A destination answering 307 to /tools/shutdown: the bridge's session refuses the
    redirected request, so the token goes only where it was configured to go."""
    monkeypatch.setenv("PACS_TOKEN", "s3cret-token")
    capture.redirect_to = "/tools/shutdown"
    endpoint = DicomWebEndpoint(url=capture.base, token_env="PACS_TOKEN", timeout_s=10)
    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    path = tmp_path / "sr.dcm"
    ds.save_as(path)
    with pytest.raises(DeliveryError, match="outside") as e:
        stow_deliver(endpoint, path)
    assert e.value.permanent
    assert [r.path for r in capture.requests] == [
        f"/dicom-web/studies/{ds.StudyInstanceUID}"]
    assert capture.requests[0].headers["Authorization"] == "Bearer s3cret-token"


def test_a_result_with_a_hostile_study_uid_is_never_sent(capture: CaptureServer,
                                                          tmp_path: Path) -> None:
    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    ds.StudyInstanceUID = "../../tools/shutdown"
    path = tmp_path / "sr.dcm"
    ds.save_as(path)
    with pytest.raises(DeliveryError, match="StudyInstanceUID is not a valid DICOM UID") as e:
        stow_deliver(DicomWebEndpoint(url=capture.base), path)
    assert e.value.permanent and capture.requests == []


def test_fhir_sessions_are_held_to_their_base(capture: CaptureServer) -> None:
    session = session_for(FhirServer(url=f"http://127.0.0.1:{capture.port}/fhir"))
    session.get(f"http://127.0.0.1:{capture.port}/fhir/Patient/abc", timeout=10)
    with pytest.raises(UnsafeUrlError):
        session.get(f"http://127.0.0.1:{capture.port}/admin", timeout=10)
    with pytest.raises(UnsafeUrlError):
        session.get(f"http://127.0.0.1:{capture.port}/fhir/../admin", timeout=10)
    assert [r.path for r in capture.requests] == ["/fhir/Patient/abc"]
    assert isinstance(UnsafeUrlError("x"), DeliveryError)
    assert not issubclass(UnsafeUrlError, requests.RequestException)


def test_mutual_tls_towards_a_dicomweb_server(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTPS server that requires a client certificate: the configured client certificate
    and CA deliver; without the certificate the server refuses; a REQUESTS_CA_BUNDLE in the
    environment does not override the configured CA."""
    from conftest import tls_certificates

    certs = tls_certificates(tmp_path / "certs")
    server = CaptureServer(tls=(certs["server.crt"], certs["server.key"], certs["ca.crt"]))
    try:
        ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
        path = tmp_path / "sr.dcm"
        ds.save_as(path)
        (tmp_path / "empty.pem").write_text("")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "empty.pem"))
        endpoint = DicomWebEndpoint(url=server.base, ca_bundle=certs["ca.crt"],
                                    client_certificate=certs["client.crt"],
                                    client_key=certs["client.key"], timeout_s=10)
        assert stow_deliver(endpoint, path) is None
        assert server.requests[-1].path == f"/dicom-web/studies/{ds.StudyInstanceUID}"
        bare = DicomWebEndpoint(url=server.base, ca_bundle=certs["ca.crt"], timeout_s=10)
        with pytest.raises(Exception, match="no answer|SSL|certificate"):
            stow_deliver(bare, path)
        assert len(server.requests) == 1
    finally:
        server.stop()


def test_basic_auth_and_an_unset_token_variable(capture: CaptureServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from medvision.errors import ConfigError

    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    path = tmp_path / "sr.dcm"
    ds.save_as(path)
    monkeypatch.setenv("PACS_PASSWORD", "pw")
    stow_deliver(DicomWebEndpoint(url=capture.base, username="bridge",
                                  password_env="PACS_PASSWORD"), path)
    assert capture.requests[-1].headers["Authorization"] == "Basic YnJpZGdlOnB3"
    monkeypatch.delenv("PACS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="PACS_TOKEN"):
        stow_deliver(DicomWebEndpoint(url=capture.base, token_env="PACS_TOKEN"), path)
    assert len(capture.requests) == 1


def test_a_stow_answer_that_does_not_list_the_object_is_not_a_delivery(tmp_path: Path) -> None:
    server = CaptureServer(list_stored=False)
    try:
        ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
        path = tmp_path / "sr.dcm"
        ds.save_as(path)
        with pytest.raises(DeliveryError, match="did not list the object as stored") as e:
            stow_deliver(DicomWebEndpoint(url=server.base), path)
        assert not e.value.permanent  # retried, then failed by the bridge's retry settings
    finally:
        server.stop()


def test_peer_names_in_log_lines_cannot_forge_a_line() -> None:
    from medvision.pacs.receive import printable

    assert printable("STORESCU") == "STORESCU"
    forged = printable("X\nERROR forged line")
    assert "\n" not in forged and "\\n" in forged


def test_qido_answers_with_hostile_uids_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A DICOMweb source answering QIDO-RS with a study UID made to escape the URL: the
    watcher skips it, says why, and never builds a request from it."""
    from medvision.pacs.web import _checked_uid

    good = {"0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]}}
    assert _checked_uid(good, "StudyInstanceUID", "pacs") == "1.2.826.0.1.3680043.8.498.1"
    for hostile in (["../../tools/shutdown"], ["1.2", "1.3"], [], ["1." + "2" * 70]):
        item = {"0020000D": {"vr": "UI", "Value": hostile}}
        with caplog.at_level("WARNING", logger="medvision"):
            assert _checked_uid(item, "StudyInstanceUID", "pacs") is None
    assert caplog.text.count("skipped a QIDO-RS result") == 4
    assert "tools/shutdown" not in caplog.text
