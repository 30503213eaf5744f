"""The bridge over DICOMweb against a real Orthanc with its DICOMweb plugin: `pacs watch` polls
(QIDO-RS), retrieves (WADO-RS) and stores results back (STOW-RS); the bridge's own STOW-RS
endpoint receives; FHIR Bundles go to a FHIR server (a strict stub: see fhir_stub.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
import yaml

from conftest import chest_radiograph, mr_series_from_nifti, wait_until
from fhir_stub import FhirStub
from orthanc_peer import Orthanc, free_port

pytestmark = pytest.mark.integration

MEDVISION = str(Path(sys.executable).parent / "medvision")
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "dicomweb.yaml"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", dicomweb=True)
    yield server
    server.stop()


@pytest.fixture
def fhir() -> Iterator[FhirStub]:
    server = FhirStub()
    yield server
    server.stop()


def _client(orthanc: Orthanc):  # noqa: ANN202 - dicomweb-client type
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(orthanc.dicomweb.rstrip("/"))


def _modalities(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Modality of every instance of the study, as QIDO-RS reports it."""
    client = _client(orthanc)
    out = []
    for series in client.search_for_series(study_uid):
        modality = series["00080060"]["Value"][0]
        uid = series["0020000E"]["Value"][0]
        out += [modality] * len(client.search_for_instances(study_uid, uid))
    return out


class BridgeProcess:
    def __init__(self, root: Path, settings: dict, action: str, env: dict[str, str] | None = None
                 ) -> None:
        self.workdir = root / "bridge"
        self.config = root / "bridge.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.log = root / "bridge.log"
        self.action = action
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        handle = self.log.open("a")
        self.proc = subprocess.Popen([MEDVISION, "--log-level", "INFO", "pacs", self.action,
                                      "--config", str(self.config), "--workdir", str(self.workdir)],
                                     stdout=handle, stderr=handle, env=self.env)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def status(self) -> dict:
        result = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(self.workdir),
                                 "--json"], capture_output=True, text=True)
        return json.loads(result.stdout)

    def analyses(self) -> dict[str, int]:
        with sqlite3.connect(self.workdir / "jobs.sqlite") as db:
            return dict(db.execute("SELECT study_uid, analyses FROM studies").fetchall())


def test_watch_analyses_each_study_once_across_sigkill(orthanc: Orthanc, fhir: FhirStub,
                                                       shared_data: Path, tmp_path: Path) -> None:
    settings = yaml.safe_load(EXAMPLE.read_text())  # the shipped example, pointed at this Orthanc
    settings["sources"][0]["dicomweb"]["url"] = orthanc.dicomweb
    settings["sources"][0]["poll_interval_s"] = 1
    settings["quiet_period_s"] = 1
    settings["fhir"] = {"server": {"url": fhir.url}}
    bridge = BridgeProcess(tmp_path, settings, "watch")
    client = _client(orthanc)
    chest, chest_study = chest_radiograph(tmp_path / "chest")
    client.store_instances([pydicom.dcmread(chest)])
    bridge.start()
    try:
        wait_until(lambda: "SR" in _modalities(orthanc, chest_study), 300,
                   "no SR for the radiograph via QIDO-RS")
        mr = mr_series_from_nifti(
            sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[0], tmp_path / "mr")
        mr_study = str(pydicom.dcmread(mr[0]).StudyInstanceUID)
        client.store_instances([pydicom.dcmread(p) for p in mr])
        # SIGKILL once the MR's retrieval has begun, then restart
        wait_until(lambda: mr_study in bridge.analyses(), 120, "the MR was not retrieved")
        bridge.kill()
        bridge.start()
        wait_until(lambda: {"SR", "SEG"} <= set(_modalities(orthanc, mr_study)), 300,
                   "no SR/SEG for the MR via QIDO-RS")
        wait_until(lambda: all(s["state"] == "done" for s in bridge.status()["studies"]), 120,
                   "results not all delivered")
        time.sleep(4)  # several more polls: our own results must not start a new analysis
        assert _modalities(orthanc, chest_study).count("SR") == 1
        assert _modalities(orthanc, mr_study).count("SR") == 1
        assert _modalities(orthanc, mr_study).count("SEG") == 1
        analyses = bridge.analyses()
        assert analyses[chest_study] == 1  # done before the kill: not repeated after restart
        assert set(analyses) == {chest_study, mr_study}
        # FHIR: one DiagnosticReport per study reached the server, validated there
        from fhir.resources.R4B.diagnosticreport import DiagnosticReport

        reports = fhir.of_type("DiagnosticReport")
        assert len(reports) == 2 and not fhir.rejected
        for report in reports:
            DiagnosticReport.model_validate(report)
        studies = {s["identifier"][0]["value"] for s in fhir.of_type("ImagingStudy")}
        assert studies == {f"urn:oid:{chest_study}", f"urn:oid:{mr_study}"}
        bundles = list((bridge.workdir / "results").rglob("fhir.json"))
        assert len(bundles) == 2  # written next to each report.json too
        # pacs status: every source and destination with its queue and last success
        endpoints = {(e["role"], e["name"]): e for e in bridge.status()["endpoints"]}
        assert set(endpoints) == {("source", "orthanc"), ("destination", "orthanc"),
                                  ("destination", "fhir")}
        assert all(e["last_success"] and e["queue"] == 0 for e in endpoints.values())
        text = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(bridge.workdir)],
                              capture_output=True, text=True).stdout
        assert "source orthanc (DICOMweb" in text and "destination fhir (FHIR" in text
    finally:
        bridge.stop()


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + part + b"\r\n" for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs_listener_tokens_corrupt_instances_and_delivery(orthanc: Orthanc,
                                                                tmp_path: Path) -> None:
    port = free_port()
    settings = yaml.safe_load(EXAMPLE.read_text())
    del settings["sources"]
    settings.update(port=None, quiet_period_s=1, fhir=None,
                    stow={"port": port, "senders": [{"name": "ris", "token_env": "MV_RIS_TOKEN"}]},
                    destination={"url": orthanc.dicomweb})
    bridge = BridgeProcess(tmp_path, settings, "listen", env={"MV_RIS_TOKEN": "s3cret-token"})
    bridge.start()
    url = f"http://127.0.0.1:{port}/studies"

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 120, "the STOW-RS listener did not start")
        chest, study = chest_radiograph(tmp_path / "chest")
        good = chest.read_bytes()
        bad = pydicom.dcmread(chest)
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]  # truncated pixel data
        bad.save_as(tmp_path / "bad.dcm")
        body, content_type = _multipart([good, (tmp_path / "bad.dcm").read_bytes()])
        # a wrong token: 401, nothing stored
        answer = requests.post(url, data=body, headers={"Content-Type": content_type,
                                                        "Authorization": "Bearer wrong"},
                               timeout=60)
        assert answer.status_code == 401
        assert not list((bridge.workdir / "spool").rglob("*.dcm"))
        answer = requests.post(url, data=body, headers={"Content-Type": content_type},
                               timeout=60)
        assert answer.status_code == 401
        # the right token: the good instance stored, the corrupt one in the failed sequence
        answer = requests.post(f"{url}/{study}", data=body, timeout=60, headers={
            "Content-Type": content_type, "Authorization": "Bearer s3cret-token"})
        assert answer.status_code == 202
        assert answer.headers["content-type"].startswith("application/dicom+json")
        response = pydicom.Dataset.from_json(answer.json())
        assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [
            str(pydicom.dcmread(chest).SOPInstanceUID)]
        assert [str(i.ReferencedSOPInstanceUID) for i in response.FailedSOPSequence] == [
            str(bad.SOPInstanceUID)]
        assert response.FailedSOPSequence[0].FailureReason == 0xC000
        assert len(list((bridge.workdir / "spool").rglob("*.dcm"))) == 1
        # analysed, and the results delivered by STOW-RS to the destination
        wait_until(lambda: "SR" in _modalities(orthanc, study), 300, "no SR delivered")
        status = bridge.status()
        assert status["studies"][0]["source"] == "stow"
        assert status["studies"][0]["calling_ae"] == "ris"
        endpoints = {(e["role"], e["name"]): e for e in status["endpoints"]}
        assert endpoints[("source", "stow")]["last_success"]
        wait_until(lambda: bridge.status()["endpoints"] and all(
            e["last_success"] for e in bridge.status()["endpoints"]), 60, "no success recorded")
        sr = next(s for s in _client(orthanc).search_for_series(study)
                  if s["00080060"]["Value"][0] == "SR")
        assert sr["0020000D"]["Value"][0] == study  # into the source study
    finally:
        bridge.stop()
