"""The bridge trusts nothing it receives, tried against real peers: dcmtk's storescu and curl-
like STOW-RS requests send hostile UIDs; a real Orthanc with its DICOMweb plugin is the
destination, reached by STOW-RS with a bearer token. A crafted Study Instance UID must not
reach Orthanc's /tools/shutdown (it did, before the checks), nor any path outside /dicom-web/.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from security_peers import multipart, small_radiograph, start_two_listener_bridge

from conftest import dcmtk_tool, require, wait_until
from orthanc_peer import Orthanc

pytestmark = pytest.mark.integration

STORESCU = dcmtk_tool("storescu") or "storescu"
TOKEN = "stow-sender-token"
HOSTILE_UIDS = {
    "slash": "1.2.826.0.1/../../tmp/x",
    "dot-dot": "../../../../../../tmp/medvision-escape",
    "long": "1." + "2" * 198,
    "multi-valued": "1.2.3\\1.2.4",
    "leading-zero": "1.2.03",
}


class Setup:
    def __init__(self, root: Path) -> None:
        require(dcmtk_tool("storescu") is not None, "dcmtk is not installed (apt-get install "
                "dcmtk)")
        self.root = root
        self.orthanc = Orthanc(root / "orthanc", dicomweb=True)
        self.bridge, self.port, self.stow_port = start_two_listener_bridge(
            root, destination_url=self.orthanc.dicomweb, calling_ae="STORESCU",
            stow_token=TOKEN)

    @property
    def stow_url(self) -> str:
        return f"http://127.0.0.1:{self.stow_port}/studies"

    def storescu(self, files: list[Path]) -> subprocess.CompletedProcess:
        return subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", "MEDVISION",
                               "127.0.0.1", str(self.port), *map(str, files)],
                              capture_output=True, text=True, timeout=120)

    def stow(self, files: list[Path], url: str | None = None) -> requests.Response:
        body, content_type = multipart(files)
        return requests.post(url or self.stow_url, data=body, timeout=60,
                             headers={"Content-Type": content_type,
                                      "Authorization": f"Bearer {TOKEN}"})

    def stop(self) -> None:
        self.bridge.stop()
        self.orthanc.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    running = Setup(tmp_path_factory.mktemp("security"))
    yield running
    running.stop()


def _orthanc_up(orthanc: Orthanc) -> bool:
    return bool(orthanc.get("/system"))


def test_stow_rs_traversal_uid_is_refused_and_orthanc_stays_up(setup: Setup) -> None:
    path = setup.root / "in" / "shutdown.dcm"
    small_radiograph(path, StudyInstanceUID="../../tools/shutdown")
    response = setup.stow([path])
    assert response.status_code == 409, response.text
    answer = pydicom.Dataset.from_json(response.json())
    assert len(answer.FailedSOPSequence) == 1 and not answer.ReferencedSOPSequence
    assert answer.FailedSOPSequence[0].FailureReason == 0xC000
    # the URL form: the study segment is checked before the body is read
    response = setup.stow([path], f"{setup.stow_url}/..%2F..%2Ftools%2Fshutdown")
    assert response.status_code in (400, 404), response.status_code
    log = setup.bridge.log_text()
    assert "StudyInstanceUID is not a valid DICOM UID" in log
    assert "../../tools/shutdown" not in log
    assert _orthanc_up(setup.orthanc)
    assert "../../tools/shutdown" not in setup.bridge.studies()
    assert not list((setup.bridge.workdir / "spool").rglob("*.dcm"))


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_dimse_hostile_uids_get_a_failure_status_and_a_logged_reason(setup: Setup,
                                                                      keyword: str) -> None:
    files = []
    for name, value in HOSTILE_UIDS.items():
        path = setup.root / "dimse" / keyword / f"{name}.dcm"
        small_radiograph(path, **{keyword: value})
        files.append(path)
    before = setup.bridge.log_text().count(f"{keyword} is not a valid DICOM UID")
    for path in files:  # one association each: storescu stops at a failure status
        result = setup.storescu([path])
        # storescu reports the bridge's status 0xC210 as "CannotUnderstand"
        assert "Error: CannotUnderstand" in result.stderr, (path.name, result.stderr)
    wait_until(lambda: setup.bridge.log_text().count(f"{keyword} is not a valid DICOM UID")
               >= before + len(files), 30, "no logged reason for each refusal")
    assert not list((setup.bridge.workdir / "spool").rglob("*.dcm"))
    assert not Path("/tmp/medvision-escape").exists()
    assert setup.bridge.studies() == {}


def test_a_valid_study_still_goes_through_to_orthanc(setup: Setup) -> None:
    """The checks refuse only what is malformed: a clean radiograph is analysed and its SR
    reaches Orthanc by STOW-RS under /dicom-web/, and passes dciodvfy."""
    path = setup.root / "good" / "cr.dcm"
    ds = small_radiograph(path, PatientName="CLEAN^CASE", PatientID="CLEAN-1")
    result = setup.storescu([path])
    assert result.returncode == 0, result.stderr
    study = str(ds.StudyInstanceUID)
    wait_until(lambda: "SR" in setup.orthanc.modalities(study), 300, "no SR in Orthanc")
    if shutil.which("dciodvfy"):
        sr = next(i for i in setup.orthanc.instances_in_study(study)
                  if setup.orthanc.get(f"/series/{i['ParentSeries']}")["MainDicomTags"]
                  ["Modality"] == "SR")
        file = setup.root / "good" / "sr.dcm"
        file.write_bytes(setup.orthanc.raw(f"/instances/{sr['ID']}/file"))
        check = subprocess.run(["dciodvfy", str(file)], capture_output=True, text=True)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert not errors, errors
