"""Helpers for the bridge's security tests: small real radiographs with chosen header values,
STOW-RS requests, and a bridge process whose log and work folder can be read back."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from conftest import pydicom_test_files

MEDVISION = str(Path(sys.executable).parent / "medvision")


def small_radiograph(path: Path, **values: Any) -> Any:
    """pydicom-data's RG1 (a real CR chest radiograph) at 256 x 256 pixels, as a new study,
    with ``values`` set in its header (whatever they are: the point is to send them)."""
    import pydicom
    from PIL import Image
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm"))
    pixels = ds.pixel_array
    small = np.asarray(Image.fromarray(pixels).resize((256, 256), Image.BILINEAR))
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.astype(pixels.dtype).tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return ds


def multipart(files: list[Path]) -> tuple[bytes, str]:
    """A STOW-RS body (multipart/related; type="application/dicom") and its content type."""
    boundary = uuid.uuid4().hex
    body = b""
    for path in files:
        body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        body += path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


class BridgeProcess:
    """``medvision pacs listen`` in a process of its own, logging to a file."""

    def __init__(self, root: Path, settings: dict[str, Any], *,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.workdir = root / "bridge"
        self.config = root / "bridge.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.log = root / "bridge.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        handle = self.log.open("a")
        self.proc = subprocess.Popen([MEDVISION, "--log-level", "INFO", "pacs", "listen",
                                      "--config", str(self.config), "--workdir",
                                      str(self.workdir)],
                                     stdout=handle, stderr=handle, env=self.env)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def studies(self) -> dict[str, str]:
        """Study UID -> state, from the job database."""
        if not (self.workdir / "jobs.sqlite").exists():
            return {}
        with sqlite3.connect(self.workdir / "jobs.sqlite") as db:
            return dict(db.execute("SELECT study_uid, state FROM studies").fetchall())

    def status(self) -> tuple[int, dict[str, Any]]:
        result = subprocess.run([MEDVISION, "pacs", "status", "--workdir", str(self.workdir),
                                 "--json"], capture_output=True, text=True)
        return result.returncode, json.loads(result.stdout)


def start_two_listener_bridge(root: Path, *, destination_url: str, calling_ae: str,
                              stow_token: str) -> tuple[BridgeProcess, int, int]:
    """A bridge with a DIMSE listener (accepting ``calling_ae``) and a STOW-RS listener (one
    sender, ``stow_token``), sending results by STOW-RS with a bearer token to
    ``destination_url``; started, and its ports."""
    from conftest import wait_until
    from orthanc_peer import free_port

    port, stow_port = free_port(), free_port()
    settings = {
        "ae_title": "MEDVISION", "port": port, "allowed_calling_aes": [calling_ae],
        "quiet_period_s": 1, "poll_interval_s": 0.2, "workers": 1,
        "destination": {"url": destination_url, "token_env": "PACS_TOKEN"},
        "stow": {"port": stow_port, "senders": [{"name": "ris", "token_env": "STOW_TOKEN"}]},
        "routes": [{"pipeline": "chest-xray-pneumonia", "modalities": ["CR", "DX"]}],
        "retry": {"backoff_s": 0.5, "max_backoff_s": 2, "max_attempts": 3}}
    bridge = BridgeProcess(root, settings, env={"PACS_TOKEN": "pacs-token",
                                                "STOW_TOKEN": stow_token})
    bridge.start()
    wait_until(lambda: "STOW-RS listening" in bridge.log_text(), 120,
               "the bridge did not start")
    return bridge, port, stow_port
