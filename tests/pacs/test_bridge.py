"""The PACS bridge against real peers: dcmtk's storescu sends, a real Orthanc receives results."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from conftest import (
    chest_radiograph,
    dcmtk_tool,
    mr_series_from_nifti,
    pydicom_test_files,
    require,
    sr_content,
    tls_certificates,
    wait_until,
)
from orthanc_peer import Orthanc, free_port

pytestmark = pytest.mark.integration

RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")
MEDVISION = str(Path(sys.executable).parent / "medvision")
# dcmtk, not pynetdicom's same-named apps in the virtual environment
STORESCU, ECHOSCU = dcmtk_tool("storescu") or "storescu", dcmtk_tool("echoscu") or "echoscu"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


class BridgeProcess:
    def __init__(self, root: Path, orthanc: Orthanc) -> None:
        self.port = free_port()
        self.workdir = root / "bridge"
        self.config = root / "bridge.yaml"
        settings = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "examples" /
                                   "bridge.yaml").read_text())
        settings.update(port=self.port, quiet_period_s=2,
                        destination={"ae_title": "ORTHANC", "host": "127.0.0.1",
                                     "port": orthanc.dicom})
        self.config.write_text(yaml.safe_dump(settings))
        self.log = root / "bridge.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        handle = self.log.open("a")
        self.proc = subprocess.Popen([MEDVISION, "--log-level", "INFO", "pacs", "listen",
                                      "--config", str(self.config), "--workdir", str(self.workdir)],
                                     stdout=handle, stderr=handle)
        wait_until(lambda: subprocess.run([ECHOSCU, "-aet", "STORESCU", "-aec", "MEDVISION",
                                      "127.0.0.1", str(self.port)], capture_output=True).returncode == 0,
              120, "bridge did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def storescu(self, files: list[Path], *, aet: str = "STORESCU") -> subprocess.CompletedProcess:
        return subprocess.run([STORESCU, "-aet", aet, "-aec", "MEDVISION", "127.0.0.1",
                               str(self.port), *map(str, files)], capture_output=True, text=True)


@pytest.fixture
def bridge(tmp_path: Path, orthanc: Orthanc) -> Iterator[BridgeProcess]:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    process = BridgeProcess(tmp_path, orthanc)
    process.start()
    yield process
    process.stop()


def test_results_arrive_in_the_source_study(bridge: BridgeProcess, orthanc: Orthanc,
                                           shared_data: Path, tmp_path: Path) -> None:
    import highdicom as hd

    chest, chest_study = chest_radiograph(tmp_path / "chest")
    mr = mr_series_from_nifti(sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[0],
                    tmp_path / "mr")
    ct = sorted((shared_data / "dicom" / "ct_head_tilt").glob("*.dcm"))
    for files in ([chest], mr, ct):
        result = bridge.storescu(files)
        assert result.returncode == 0, result.stderr
    mr_study = str(pydicom.dcmread(mr[0]).StudyInstanceUID)
    wait_until(lambda: "SR" in orthanc.modalities(chest_study), 300, "no SR for the radiograph")
    wait_until(lambda: {"SR", "SEG"} <= set(orthanc.modalities(mr_study)), 300, "no SR/SEG for the MR")
    assert "OT" in orthanc.modalities(chest_study)  # the saliency overlay, not for diagnosis
    # The adult CR radiograph is out of distribution for the paediatric model: the SR says so
    sr_instance = next(i for i in orthanc.instances_in_study(chest_study)
                       if orthanc.get(f"/series/{i['ParentSeries']}")["MainDicomTags"]
                       ["Modality"] == "SR")
    (tmp_path / "sr.dcm").write_bytes(orthanc.raw(f"/instances/{sr_instance['ID']}/file"))
    items = sr_content(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert items["Quality Finding"] == "Flagged: result may not apply"
    assert items["Out of distribution"] == "Yes"
    assert items["Out-of-distribution distance"] > items["Out-of-distribution threshold"] > 0
    assert items["Decision threshold"] == pytest.approx(0.5)
    seg_instance = next(i for i in orthanc.instances_in_study(mr_study)
                        if orthanc.get(f"/series/{i['ParentSeries']}")["MainDicomTags"]
                        ["Modality"] == "SEG")
    (tmp_path / "seg.dcm").write_bytes(orthanc.raw(f"/instances/{seg_instance['ID']}/file"))
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, mr)}
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == pydicom.dcmread(mr[0]).SeriesInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in pydicom.dcmread(mr[0]).ImageOrientationPatient], atol=1e-4)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
    # The saliency volume as a Parametric Map on the same frames
    def parametric_maps() -> list[dict]:
        return [i for i in orthanc.instances_in_study(mr_study)
                if orthanc.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"]
                == "1.2.840.10008.5.1.4.1.1.30"]

    wait_until(lambda: bool(parametric_maps()), 120, "no Parametric Map for the MR")
    (tmp_path / "pm.dcm").write_bytes(orthanc.raw(f"/instances/{parametric_maps()[0]['ID']}/file"))
    pm = pydicom.dcmread(tmp_path / "pm.dcm")
    assert int(pm.NumberOfFrames) == len(mr)
    assert pm.ContentLabel == "SALIENCY" and pm.pixel_array.dtype == np.float32
    assert float(pm.pixel_array.max()) > float(pm.pixel_array.min())
    positions = {uid: [float(v) for v in ds.ImagePositionPatient] for uid, ds in sources.items()}
    for frame in pm.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            positions[uid], atol=1e-3)
    # No patient identity in the bridge's log, reports or audit store (the spool and the DICOM
    # results sent back to the PACS carry it by design).
    texts = [bridge.log.read_text()]
    for path in bridge.workdir.rglob("*"):
        if path.is_file() and "spool" not in path.parts and path.suffix != ".dcm":
            data = path.read_bytes()
            if path.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            texts.append(data.decode("latin-1"))
    haystack = "\n".join(texts)
    for secret in ("Bridge^Test", "Bridge Test", "BRIDGE-1"):
        assert secret not in haystack
    status = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(bridge.workdir),
                             "--json"], capture_output=True, text=True)
    studies = json.loads(status.stdout)["studies"]
    # the CT has no route: rejected, saying so (and pacs status exits 1 for it); the rest done
    rejected = [s for s in studies if s["state"] == "rejected"]
    assert [s["error"] for s in rejected] == ["no route matches the study (modalities CT)"]
    assert {s["state"] for s in studies if s not in rejected} <= {"done", "sending"}
    assert status.returncode == 1


def test_sigkill_and_restart_lose_nothing(bridge: BridgeProcess, orthanc: Orthanc,
                                          tmp_path: Path) -> None:
    studies = []
    for i in range(3):
        path, uid = chest_radiograph(tmp_path / f"c{i}")
        studies.append(uid)
        assert bridge.storescu([path]).returncode == 0  # acknowledged
    bridge.kill()  # before the quiet period ends: nothing analysed yet
    spooled = list((bridge.workdir / "spool").rglob("*.dcm"))
    assert len(spooled) == 3
    bridge.start()
    time.sleep(3)  # the quiet period (2 s) has passed: analysis is under way
    bridge.kill()
    bridge.start()
    for uid in studies:
        wait_until(lambda uid=uid: orthanc.modalities(uid).count("SR") >= 1, 300, "no SR after restart")
    time.sleep(4)  # let any duplicate arrive, if one were going to
    for uid in studies:
        assert orthanc.modalities(uid).count("SR") == 1
        assert orthanc.modalities(uid).count("CR") == 0  # only results go to Orthanc


def test_unknown_calling_ae_is_rejected(bridge: BridgeProcess, tmp_path: Path) -> None:
    chest, _ = chest_radiograph(tmp_path / "x")
    result = bridge.storescu([chest], aet="INTRUDER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    assert not list((bridge.workdir / "spool").rglob("*.dcm")), "an instance was spooled"
    wait_until(lambda: "rejected an association" in bridge.log.read_text(), 10,
               "the rejected association was not logged")
    assert "calling AE 'INTRUDER'" in bridge.log.read_text()


def test_corrupt_instance_gets_a_failure_status(bridge: BridgeProcess, tmp_path: Path) -> None:
    from pynetdicom import AE

    ds = pydicom.dcmread(RG1)
    ds.PatientName = "Corrupt^Secret"
    ds.PixelData = ds.PixelData[:1000]  # truncated in transit
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", bridge.port, ae_title="MEDVISION")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    wait_until(lambda: "refused an instance" in bridge.log.read_text(), 30,
               "the refusal was never logged")
    log = bridge.log.read_text()
    assert "refused an instance from STORESCU (answered 0xC210)" in log
    assert "Corrupt" not in log and "Secret" not in log


def test_tls_listener_requires_a_client_certificate(tmp_path: Path) -> None:
    """With `tls` (certificate, key, CA) only peers with a certificate from that CA get in:
    dcmtk over TLS with a client certificate is accepted and its instance spooled; plain TCP
    and anonymous TLS are refused."""
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    certs = tls_certificates(tmp_path / "certs")
    port = free_port()
    settings = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "examples" /
                               "bridge.yaml").read_text())
    settings.update(port=port, quiet_period_s=600,  # receive only: no analysis in this test
                    destination={"ae_title": "NOBODY", "host": "127.0.0.1", "port": 9},
                    tls={"certificate": str(certs["server.crt"]), "key": str(certs["server.key"]),
                         "ca": str(certs["ca.crt"])})
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump(settings))
    workdir, log = tmp_path / "bridge", (tmp_path / "bridge.log").open("a")
    proc = subprocess.Popen([MEDVISION, "pacs", "listen", "--config", str(config), "--workdir",
                             str(workdir)], stdout=log, stderr=log)
    tls = ["+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"])]
    peer = ["-aet", "STORESCU", "-aec", "MEDVISION", "127.0.0.1", str(port)]
    try:
        wait_until(lambda: subprocess.run([ECHOSCU, *tls, *peer],
                                     capture_output=True).returncode == 0,
              120, "TLS bridge did not answer a TLS echo")
        assert subprocess.run([ECHOSCU, *peer], capture_output=True,
                              timeout=60).returncode != 0
        anonymous = ["+tla", "+cf", str(certs["ca.crt"])]
        assert subprocess.run([ECHOSCU, *anonymous, *peer], capture_output=True,
                              timeout=60).returncode != 0
        chest, study = chest_radiograph(tmp_path / "chest")
        sent = subprocess.run([STORESCU, *tls, *peer, str(chest)], capture_output=True,
                              text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        status = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(workdir),
                                 "--json"], capture_output=True, text=True, check=True)
        studies = json.loads(status.stdout)["studies"]
        assert len(studies) == 1 and studies[0]["instances"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


# the first case (all kept) is in the slow run; the default run keeps the harder one
@pytest.mark.parametrize("orthanc_drops_sr", [pytest.param(False, marks=pytest.mark.slow), True])
def test_storage_commitment_against_orthanc(tmp_path: Path, orthanc_drops_sr: bool) -> None:
    """With storage_commitment on, a result counts only once Orthanc's N-EVENT-REPORT says it
    keeps it. An Orthanc whose filter drops SRs still answers the C-STORE with Success; only
    the commitment report shows the SR is not there, and the bridge sends it again until
    max_attempts, then marks it failed."""
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    bridge_port = free_port()
    extra: dict[str, object] = {
        "DicomModalities": {"medvision": ["MEDVISION", "127.0.0.1", bridge_port]}}
    if orthanc_drops_sr:
        script = tmp_path / "drop_sr.lua"
        script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                          "  return dicom.Modality ~= 'SR'\nend\n")
        extra["LuaScripts"] = [str(script)]
    orthanc = Orthanc(tmp_path / "orthanc", **extra)
    try:
        bridge = BridgeProcess(tmp_path, orthanc)
        bridge.port = bridge_port
        settings = yaml.safe_load(bridge.config.read_text())
        settings["port"] = bridge_port
        settings["destination"]["storage_commitment"] = True
        settings["retry"] = {"backoff_s": 0.2, "max_backoff_s": 0.5, "max_attempts": 2}
        bridge.config.write_text(yaml.safe_dump(settings))
        bridge.start()
        try:
            chest, study_uid = chest_radiograph(tmp_path / "chest")
            assert bridge.storescu([chest]).returncode == 0

            def outbox() -> dict[str, dict]:
                return {o["kind"]: o for o in json.loads(subprocess.run(
                    [MEDVISION, "pacs", "status", "--workdir", str(bridge.workdir), "--json"],
                    capture_output=True, text=True).stdout)["outbox"]}

            final = {"committed", "failed"}
            wait_until(lambda: len(outbox()) == 2 and {o["state"] for o in
                                                       outbox().values()} <= final,
                       90, "storage commitment never settled")
            items = outbox()
            assert items["SC"]["state"] == "committed"
            if orthanc_drops_sr:
                assert items["SR"]["state"] == "failed" and items["SR"]["attempts"] == 2
                assert "did not commit" in items["SR"]["error"]
                assert "SR" not in orthanc.modalities(study_uid)
            else:
                assert items["SR"]["state"] == "committed"
                assert "SR" in orthanc.modalities(study_uid)
        finally:
            bridge.stop()
    finally:
        orthanc.stop()
