"""The bridge under hospital faults: a real bridge process, dcmtk as the modality, and a real
pynetdicom Store SCP as the destination that answers with chosen statuses or is down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import JPEG2000Lossless, generate_uid

from medvision.audit import AuditLog

from conftest import dcmtk_tool, mr_series_from_nifti, pydicom_test_files, require, wait_until
from scripted_peer import COMPREHENSIVE_3D_SR, ScriptedPeer, free_port

pytestmark = pytest.mark.integration

MEDVISION = str(Path(sys.executable).parent / "medvision")
RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")


class BridgeProcess:
    """``medvision pacs listen`` in its own process, sending to ``destination``."""

    def __init__(self, root: Path, destination: int, **settings: object) -> None:
        self.port = free_port()
        self.workdir = root / "bridge"
        self.config = root / "bridge.yaml"
        config = {
            "ae_title": "MEDVISION", "port": self.port, "allowed_calling_aes": ["STORESCU"],
            "quiet_period_s": 1.0, "poll_interval_s": 0.2, "workers": 2,
            "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": destination},
            "routes": [{"pipeline": "chest-xray-pneumonia", "modalities": ["CR", "DX"]},
                       {"pipeline": "hippocampus-seg", "modalities": ["MR"]}],
            "retry": {"backoff_s": 0.2, "max_backoff_s": 0.5, "max_attempts": 3},
        }
        config.update(settings)
        self.config.write_text(yaml.safe_dump(config))
        self.log = root / "bridge.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> BridgeProcess:
        handle = self.log.open("a")
        self.proc = subprocess.Popen([MEDVISION, "--log-level", "INFO", "pacs", "listen",
                                      "--config", str(self.config), "--workdir",
                                      str(self.workdir)], stdout=handle, stderr=handle)
        echoscu = dcmtk_tool("echoscu")
        wait_until(lambda: subprocess.run([echoscu, "-aet", "STORESCU", "-aec", "MEDVISION",
                                           "127.0.0.1", str(self.port)],
                                          capture_output=True).returncode == 0,
                   120, "bridge did not start")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def send(self, files: list[Path], *extra: str) -> None:
        result = subprocess.run([dcmtk_tool("storescu"), *extra, "-aet", "STORESCU", "-aec",
                                 "MEDVISION", "127.0.0.1", str(self.port), *map(str, files)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    def status(self) -> tuple[int, dict]:
        result = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(self.workdir),
                                 "--json"], capture_output=True, text=True)
        return result.returncode, json.loads(result.stdout)

    def states(self) -> set[str]:
        return {s["state"] for s in self.status()[1]["studies"]}


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    server = ScriptedPeer().start()
    yield server
    server.stop()


@pytest.fixture
def bridge_for(tmp_path: Path) -> Iterator:
    started: list[BridgeProcess] = []

    def make(destination: int, **settings: object) -> BridgeProcess:
        process = BridgeProcess(tmp_path, destination, **settings).start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


def _radiograph(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(RG1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "cr.dcm"
    ds.save_as(path)
    return path


def test_warning_status_is_delivered_once(peer: ScriptedPeer, bridge_for, tmp_path: Path) -> None:
    peer.status = 0xB000  # "coercion of data elements": stored, with a remark
    bridge = bridge_for(peer.port)
    bridge.send([_radiograph(tmp_path / "in")])
    wait_until(lambda: bridge.states() == {"done"}, 180, "study never finished")
    assert len(peer.of_class(COMPREHENSIVE_3D_SR)) == 1
    assert set(peer.received.values()) == {1}  # SR and overlay, each sent exactly once
    code, status = bridge.status()
    assert code == 0 and all(o["state"] == "sent" for o in status["outbox"])
    assert all("0xB000" in o["note"] for o in status["outbox"])


def test_failure_is_retried_then_failed_then_retried_on_request(peer: ScriptedPeer, bridge_for,
                                                                tmp_path: Path) -> None:
    peer.status = 0xA700  # out of resources, every time
    bridge = bridge_for(peer.port)
    bridge.send([_radiograph(tmp_path / "in")])
    wait_until(lambda: bridge.states() == {"failed"}, 180, "study never failed")
    code, status = bridge.status()
    assert code == 1
    assert {o["state"] for o in status["outbox"]} == {"failed"}
    assert all(o["attempts"] == 3 and "0xA700" in o["error"] for o in status["outbox"])
    assert set(peer.received.values()) == {3}  # max_attempts tries, then no more
    study = status["studies"][0]
    assert "0xA700" in study["error"]
    records = list(AuditLog(bridge.workdir / "audit.sqlite").records())
    assert sum(r["action"] == "deliver" and r["status"] == "failed" for r in records) == 2
    peer.status = 0x0000  # the PACS is fixed
    retried = subprocess.run([MEDVISION, "pacs", "retry", "--workdir", str(bridge.workdir),
                              study["study"]], capture_output=True, text=True)
    assert retried.returncode == 0 and "re-queued 2" in retried.stdout
    wait_until(lambda: bridge.states() == {"done"}, 60, "retry did not deliver")
    assert set(peer.received.values()) == {4}
    assert len(peer.of_class(COMPREHENSIVE_3D_SR)) == 1


def test_peer_without_the_sr_sop_class_fails_saying_so(bridge_for, tmp_path: Path) -> None:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    peer = ScriptedPeer(refuse_sop_classes=(COMPREHENSIVE_3D_SR,)).start()
    try:
        bridge = bridge_for(peer.port)
        bridge.send([_radiograph(tmp_path / "in")])
        wait_until(lambda: bridge.states() == {"failed"}, 180, "study never failed")
        items = {o["kind"]: o for o in bridge.status()[1]["outbox"]}
        assert items["SR"]["state"] == "failed" and items["SR"]["attempts"] == 1
        assert "does not accept Comprehensive 3D SR Storage" in items["SR"]["error"]
        assert items["SC"]["state"] == "sent"  # the overlay went through
    finally:
        peer.stop()


def test_two_halves_with_the_pacs_down_each_delivered_once_later_supersedes(
        shared_data: Path, bridge_for, tmp_path: Path) -> None:
    require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    port = free_port()  # nobody listens yet: the PACS is down
    bridge = bridge_for(port, quiet_period_s=1.0,
                        retry={"backoff_s": 0.5, "max_backoff_s": 1.0, "max_attempts": 1000})
    image = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[5]
    files = mr_series_from_nifti(image, tmp_path / "mr")
    half = len(files) // 2
    bridge.send(files[:half])
    wait_until(lambda: bridge.states() == {"sending"}, 180, "first analysis not queued")
    bridge.send(files[half:])
    wait_until(lambda: bridge.states() == {"sending"} and len(
        [o for o in bridge.status()[1]["outbox"] if o["kind"] == "SR"]) == 2, 180,
        "second analysis not queued")
    peer = ScriptedPeer(port=port).start()  # the PACS comes back
    try:
        wait_until(lambda: bridge.states() == {"done"}, 120, "results not delivered")
        assert set(peer.received.values()) == {1}  # every object exactly once
        first, second = sorted(peer.of_class(COMPREHENSIVE_3D_SR),
                               key=lambda ds: len(ds.CurrentRequestedProcedureEvidenceSequence[0]
                                                  .ReferencedSeriesSequence[0]
                                                  .ReferencedSOPSequence))
        assert "PredecessorDocumentsSequence" not in first
        predecessor = (second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
                       .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert predecessor == first.SOPInstanceUID
    finally:
        peer.stop()


def test_same_instance_on_four_associations_at_once_always_succeeds(
        peer: ScriptedPeer, bridge_for, tmp_path: Path) -> None:
    from pynetdicom import AE

    bridge = bridge_for(peer.port, quiet_period_s=3600)
    path = _radiograph(tmp_path / "in")
    ds = pydicom.dcmread(path)
    statuses: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", bridge.port, ae_title="MEDVISION")
        assert assoc.is_established
        for _ in range(10):
            status = assoc.send_c_store(ds)
            with lock:
                statuses.append(int(status.Status) if status else -1)
        assoc.release()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [0] * 40
    assert bridge.status()[1]["studies"][0]["instances"] == 1
    assert not [p for p in (bridge.workdir / "spool").rglob("*.tmp")]


@pytest.mark.parametrize("syntax", ["jpeg-ls", pytest.param("jpeg2000", marks=pytest.mark.slow)])
def test_compressed_studies_are_stored_and_analysed(peer: ScriptedPeer, bridge_for,
                                                    shared_data: Path, tmp_path: Path,
                                                    syntax: str) -> None:
    """A modality that sends its compressed images as they are (storescu -R -xt / -xv: only
    the required SOP class, in the file's own syntax; dcmtk cannot decompress these to fall
    back on an uncompressed one): JPEG-LS made by dcmtk's dcmcjpls, JPEG 2000 by OpenJPEG
    through pydicom."""
    image = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))[7]
    files = mr_series_from_nifti(image, tmp_path / "mr")
    for path in files:
        if syntax == "jpeg-ls":
            subprocess.run([dcmtk_tool("dcmcjpls") or "dcmcjpls", str(path), str(path)],
                           check=True, capture_output=True)
        else:
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless)
            ds.save_as(path)
    expected = {"jpeg-ls": "1.2.840.10008.1.2.4.80", "jpeg2000": "1.2.840.10008.1.2.4.90"}
    assert str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID) == expected[syntax]
    bridge = bridge_for(peer.port)
    bridge.send(files, "-R", {"jpeg-ls": "-xt", "jpeg2000": "-xv"}[syntax])
    wait_until(lambda: bridge.states() == {"done"}, 180, "compressed study not analysed")
    spooled = sorted((bridge.workdir / "spool").rglob("*.dcm"))
    assert len(spooled) == len(files)
    assert str(pydicom.dcmread(spooled[0]).file_meta.TransferSyntaxUID) == expected[syntax]
    (sr,) = peer.of_class(COMPREHENSIVE_3D_SR)
    assert len(peer.of_class("1.2.840.10008.5.1.4.1.1.66.4")) == 1  # and a SEG
    assert sr.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs: a disk that really fills up (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    require(done.returncode == 0, f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def test_full_disk_refuses_keeps_answering_and_recovers_without_restart(
        peer: ScriptedPeer, bridge_for, small_disk: Path, shared_data: Path,
        tmp_path: Path) -> None:
    images = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))
    first = mr_series_from_nifti(images[9], tmp_path / "first")
    second = mr_series_from_nifti(images[10], tmp_path / "second")
    bridge = BridgeProcess(small_disk, peer.port, quiet_period_s=2.0, workers=1,
                           retry={"backoff_s": 0.2, "max_backoff_s": 0.5, "max_attempts": 50,
                                  "analysis_retry_s": 0.5, "analysis_max_attempts": 1000})
    bridge.log = tmp_path / "bridge.log"  # the log itself must not need the full disk
    bridge.start()
    try:
        bridge.send(first)  # received while there is room; analysed after the quiet period
        filler = _fill(small_disk)  # ... by which time the disk is full
        refused = subprocess.run([dcmtk_tool("storescu"), "-v", "-nh", "-aet", "STORESCU", "-aec",
                                  "MEDVISION", "127.0.0.1", str(bridge.port),
                                  *map(str, second)], capture_output=True, text=True)
        responses = [line for line in (refused.stdout + refused.stderr).splitlines()
                     if "Store Response" in line]
        assert len(responses) == len(second), responses[:3]
        assert all("Refused: OutOfResources" in line for line in responses), responses[:3]
        code, status = bridge.status()  # answers, on a full disk
        assert code in (0, 1) and len(status["studies"]) == 1
        lines_before = len(bridge.log.read_text().splitlines())
        time.sleep(5)  # the bridge keeps failing (and retrying) on the full disk meanwhile
        errors = [line for line in bridge.log.read_text().splitlines()[lines_before:]
                  if line.startswith("ERROR")]
        assert len(errors) <= 6, errors  # rate-limited, not one line per half second
        assert not list((small_disk / "bridge" / "spool").rglob("*.tmp"))
        assert bridge.proc is not None and bridge.proc.poll() is None
        filler.unlink()  # space returns; no restart
        bridge.send(second)
        wait_until(lambda: bridge.states() == {"done"} and len(bridge.status()[1]["studies"])
                   == 2, 180, "the bridge did not recover")
        assert len(peer.of_class(COMPREHENSIVE_3D_SR)) == 2
        assert set(peer.received.values()) == {1}
    finally:
        bridge.stop()
