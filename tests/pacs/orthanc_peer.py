"""A real Orthanc for integration tests (optionally with its DICOMweb plugin)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

from conftest import require, wait_until

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, root: Path, *, dicomweb: bool = False, **extra: object) -> None:
        require(shutil.which("Orthanc") is not None, "Orthanc is not installed (apt-get install orthanc)")
        if dicomweb:
            require(DICOMWEB_PLUGIN.is_file(), "Orthanc's DICOMweb plugin is not installed "
                    "(apt-get install orthanc-dicomweb)")
            extra = {"Plugins": [str(DICOMWEB_PLUGIN)],
                     "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **extra}
        self.http, self.dicom = free_port(), free_port()
        config = {"Name": "medvision-test", "StorageDirectory": str(root / "db"),
                  "IndexDirectory": str(root / "db"), "HttpPort": self.http,
                  "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "DicomAlwaysAllowStore": True, "Plugins": [], "HttpServerEnabled": True,
                  **extra}
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", "--verbose", str(root / "orthanc.json")],
                                     stdout=self.log, stderr=self.log)
        wait_until(self._up, 60, "Orthanc did not start")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            return r.read()

    def instances_in_study(self, study_uid: str) -> list[dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/tools/find", method="POST",
            data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                             "Expand": True, "RequestedTags": ["Modality", "SOPClassUID"]}).encode())
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def modalities(self, study_uid: str) -> list[str]:
        out = []
        for instance in self.instances_in_study(study_uid):
            series = self.get(f"/series/{instance['ParentSeries']}")
            out.append(series["MainDicomTags"].get("Modality", ""))
        return out

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web/"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
