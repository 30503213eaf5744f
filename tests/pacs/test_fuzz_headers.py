"""Property: hostile header values (UIDs, names, IDs, descriptions with ``../``, ``/``, ``\\``,
NUL, 200 characters, HTML and script, non-ASCII) sent into both listeners and ``analyze``.

Invariants:
- a malformed UID, or a patient/study value that results would copy and that breaks its VR,
  is refused where it arrives (C-STORE failure status, STOW-RS Failed SOP Sequence, ``analyze``
  ``rejected`` naming the attribute); anything else is accepted and analysed;
- nothing is written outside the work folder (no file or folder is named after a value);
- every outgoing request goes to a path under the configured base URL (a capture server on
  loopback records them all, with their headers);
- every object sent, and every DICOM result ``analyze --dicom`` writes, passes ``dciodvfy``
  without errors; no HTML page ``analyze`` writes holds a header value as markup.

The listeners' examples are sent by one test and the outcome checked by the next one, once
the bridge has analysed and sent everything (the two run in this order, in one module).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from capture_server import CaptureServer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from security_peers import multipart, small_radiograph, start_two_listener_bridge

from medvision.analyze import AnalyzeOptions, analyze
from medvision.audit import AuditLog, Auditor, Pseudonymizer
from medvision.infer import Predictor
from medvision.io.header_checks import (
    COPIED_ATTRIBUTES,
    EQUIPMENT_ATTRIBUTES,
    REQUIRED_UIDS,
    copied_value_problem,
    uid_problem,
)

from conftest import dcmtk_tool, require, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}

UID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
TEXT_FIELDS = ("PatientName", "PatientID", "AccessionNumber", "StudyID", "StudyDescription",
               "SeriesDescription", "InstitutionName", "ReferringPhysicianName")
NASTY = ("../../tools/shutdown", "../../../../../../tmp/medvision-escape", "/", "a/b", "\\",
         "1.2\\1.3", "x\x00y", "1.2.3\x00", "A" * 200, "1." + "2" * 198,
         "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "Müller^Jürgen",
         "李^雷", "%2e%2e%2f", "1.2.840.10008.1.1", "ROBERT'); DROP TABLE studies;--")
TOKEN = "fuzz-stow-token"


def values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY), st.text(max_size=80),
                     st.from_regex(r"[0-9.]{1,70}", fullmatch=True))


def expected_refusal(keyword: str, value: str, ds: object) -> bool:
    """Whether the bridge must refuse an instance with this value (as it was written)."""
    stored = ds[keyword].value if keyword in ds else None  # type: ignore[index,operator]
    if keyword in UID_FIELDS:  # an empty UID is refused only where it is required
        return (uid_problem(stored) is not None
                and (stored not in (None, "") or keyword in REQUIRED_UIDS))
    if keyword in COPIED_ATTRIBUTES or keyword in EQUIPMENT_ATTRIBUTES:
        return copied_value_problem(ds, keyword) is not None
    return False


def write_case(folder: Path, keyword: str, value: str) -> tuple[Path, object] | None:
    """A small real radiograph with ``keyword`` set to ``value``, or ``None`` when pydicom
    cannot even write that value (nothing to send then)."""
    path = folder / "case.dcm"
    extra = {"SpecificCharacterSet": "ISO_IR 192"} if not value.isascii() else {}
    try:
        small_radiograph(path, **extra, **{keyword: value})
    except Exception:  # noqa: BLE001 - pydicom refuses to encode it: not a case for the bridge
        return None
    import pydicom

    return path, pydicom.dcmread(path, stop_before_pixels=True)


def dciodvfy_errors(path: Path) -> list[str]:
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (check.stdout + check.stderr).splitlines()
            if line.startswith("Error")]


@dataclass
class Sent:
    keyword: str
    value: str
    channel: str
    accepted: bool
    study_uid: str


class Listeners:
    def __init__(self, root: Path) -> None:
        require(dcmtk_tool("storescu") is not None, "dcmtk is not installed")
        require(shutil.which("dciodvfy") is not None, "dicom3tools is not installed")
        self.root = root
        self.capture = CaptureServer()
        self.bridge, self.port, self.stow_port = start_two_listener_bridge(
            root, destination_url=self.capture.base, calling_ae="FUZZER", stow_token=TOKEN)
        self.sent: list[Sent] = []

    def send(self, path: Path, channel: str) -> bool:
        if channel == "stow":
            body, content_type = multipart([path])
            response = requests.post(f"http://127.0.0.1:{self.stow_port}/studies", data=body,
                                     headers={"Content-Type": content_type,
                                              "Authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert response.status_code in (200, 409), response.status_code
            return response.status_code == 200
        result = subprocess.run([dcmtk_tool("storescu") or "storescu", "-v", "-aet", "FUZZER", "-aec",
                                 "MEDVISION", "127.0.0.1", str(self.port), str(path)],
                                capture_output=True, text=True, timeout=120)
        refused = "Error: CannotUnderstand" in result.stderr
        assert refused or result.returncode == 0, result.stderr
        return not refused

    def stop(self) -> None:
        self.bridge.stop()
        self.capture.stop()


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    running = Listeners(tmp_path_factory.mktemp("fuzz-headers"))
    yield running
    running.stop()


@settings(max_examples=16, derandomize=True, **_COMMON)
@given(keyword=st.sampled_from(UID_FIELDS + TEXT_FIELDS), value=values(),
       channel=st.sampled_from(["dimse", "stow"]))
def test_listeners_refuse_exactly_the_malformed_values(listeners: Listeners, keyword: str,
                                                       value: str, channel: str) -> None:
    folder = Path(tempfile.mkdtemp(dir=_mkdir(listeners.root / "in")))
    case = write_case(folder, keyword, value)
    assume(case is not None)
    assert case is not None
    path, ds = case
    accepted = listeners.send(path, channel)
    assert accepted == (not expected_refusal(keyword, value, ds)), (keyword, value, channel)
    listeners.sent.append(Sent(keyword, value, channel, accepted,
                               str(ds.StudyInstanceUID)))  # type: ignore[attr-defined]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_what_the_listeners_accepted_went_out_only_under_the_base(listeners: Listeners) -> None:
    accepted = [s for s in listeners.sent if s.accepted]
    assert listeners.sent and accepted, "the previous test sent nothing"
    assert len(accepted) < len(listeners.sent), "no hostile value among the examples"
    wanted = {s.study_uid for s in accepted}

    def settled() -> bool:
        states = listeners.bridge.studies()
        return all(states.get(uid) in ("done", "failed", "rejected") for uid in wanted)

    wait_until(settled, 600, "the bridge did not settle every accepted study")
    refused = {s.study_uid for s in listeners.sent if not s.accepted}
    assert not refused & set(listeners.bridge.studies()), "a refused instance was filed"
    # every request under the base, with the token only there
    assert listeners.capture.requests, "nothing was sent"
    for request in listeners.capture.requests:
        assert request.method == "POST" and request.path.startswith("/dicom-web/studies/"), \
            request.path
    # every object sent passes dciodvfy
    objects = listeners.capture.objects(listeners.root / "received")
    assert objects
    for path in objects:
        assert not dciodvfy_errors(path), (path, dciodvfy_errors(path))
    # nothing written outside the work folder
    for path in listeners.bridge.workdir.rglob("*"):
        assert not any(s.value and s.value in path.name for s in listeners.sent
                       if len(s.value) > 2), path
    assert not Path("/tmp/medvision-escape").exists()
    assert {p.name for p in listeners.root.iterdir()} <= {
        "bridge", "bridge.yaml", "bridge.log", "in", "received"}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pipeline("chest-xray-pneumonia")


@settings(max_examples=10, derandomize=True, **_COMMON)
@given(keyword=st.sampled_from(UID_FIELDS + TEXT_FIELDS), value=values())
def test_analyze_rejects_exactly_the_malformed_values(predictor: Predictor, keyword: str,
                                                      value: str) -> None:
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        case = write_case(root / "in", keyword, value)
        assume(case is not None)
        assert case is not None
        _, ds = case
        auditor = Auditor(AuditLog(root / "audit.sqlite"), Pseudonymizer(b"k" * 32))
        (result,) = analyze([root / "in"], predictor, root / "out", auditor=auditor,
                            options=AnalyzeOptions(progress=False, dicom=True, fhir=True))
        refuse = expected_refusal(keyword, value, ds)
        assert result.status in (("rejected",) if refuse else ("ok", "flagged")), (
            keyword, value, result)
        if refuse:
            assert keyword in (result.reason or ""), result.reason
        outside = {p.name for p in root.iterdir()} - {"in", "out"}
        assert all(name.startswith("audit.") for name in outside), outside
        for path in (root / "out").glob("*/dicom/*.dcm"):
            assert not dciodvfy_errors(path), (keyword, value, dciodvfy_errors(path))
        for page in (root / "out").rglob("*.html"):  # header text never becomes markup
            text = page.read_text(errors="replace")
            assert "<script>alert" not in text and "<img src=x" not in text, page


@pytest.mark.slow
@settings(max_examples=200, **_COMMON)
@given(keyword=st.sampled_from(UID_FIELDS + TEXT_FIELDS), value=values())
def test_analyze_rejects_exactly_the_malformed_values_long(predictor: Predictor, keyword: str,
                                                           value: str) -> None:
    test_analyze_rejects_exactly_the_malformed_values.hypothesis.inner_test(  # type: ignore[attr-defined]
        predictor, keyword, value)
