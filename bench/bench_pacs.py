"""Receiving throughput: the medvision bridge's Store SCP against dcmtk's storescp.

Both receive the same files in the same run: 10 concurrent associations (dcmtk storescu
processes) of 50 instances each. The bridge writes every instance durably (fsync, atomic
rename, SQLite row) before it answers; storescp writes files without fsync. Prints instances/s
for each and the ratio. Analysis is switched off (no route matches) so only receiving counts.

    .venv/bin/python bench/bench_pacs.py [--associations 10] [--instances 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

BIN = Path(sys.executable).parent


def _dcmtk(name: str) -> str:
    """A dcmtk program, skipping pynetdicom's same-named apps in the virtual environment."""
    venv_bin = Path(sys.executable).parent.resolve()
    search = ":".join(p for p in os.environ.get("PATH", "").split(":")
                      if p and Path(p).resolve() != venv_bin)
    return shutil.which(name, path=search) or name


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files(folder: Path, associations: int, instances: int) -> list[list[Path]]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2000, (256, 256), dtype=np.int16).tobytes()
    groups = []
    for a in range(associations):
        study, series = generate_uid(), generate_uid()
        paths = []
        for i in range(instances):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.PatientName, ds.PatientID = "Bench^Patient", f"B{a}"
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, i], [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.Rows, ds.Columns = [1, 1], 256, 256
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = pixels
            path = folder / f"a{a}" / f"{i:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        groups.append(paths)
    return groups


def _send_all(port: int, called: str, groups: list[list[Path]]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([_dcmtk("storescu"), "-aet", "STORESCU", "-aec", called, "127.0.0.1",
                               str(port), *map(str, paths)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for paths in groups]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"storescu failed: {codes}")
    return elapsed


def _wait_port(port: int) -> None:
    for _ in range(600):
        if subprocess.run([_dcmtk("echoscu"), "-aet", "STORESCU", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("server did not start")


def _serve_and_send(server: list[str], port: int, called: str,
                    groups: list[list[Path]]) -> float:
    """Start a receiving server, send every group to it at once, stop it; seconds taken."""
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        return _send_all(port, called, groups)
    finally:
        proc.kill()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--instances", type=int, default=50)
    args = parser.parse_args(argv)
    if not shutil.which(_dcmtk("storescp")):
        print("needs dcmtk (apt-get install dcmtk)")
        return 1
    total = args.associations * args.instances
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        groups = _files(tmp / "in", args.associations, args.instances)
        port = _port()
        (tmp / "dcmtk").mkdir()
        dcmtk_s = _serve_and_send([_dcmtk("storescp"), "--fork", "-od", str(tmp / "dcmtk"), str(port)],
                                  port, "ANY-SCP", groups)
        received = len(list((tmp / "dcmtk").glob("*")))
        port = _port()
        config = {"ae_title": "MEDVISION", "port": port, "quiet_period_s": 3600,
                  "destination": {"ae_title": "NOWHERE", "port": 9},
                  "routes": [{"pipeline": "chest-xray-pneumonia", "modalities": ["XX"]}]}
        (tmp / "bridge.yaml").write_text(yaml.safe_dump(config))
        ours_s = _serve_and_send([str(BIN / "medvision"), "pacs", "listen", "--config",
                                  str(tmp / "bridge.yaml"), "--workdir", str(tmp / "bridge")],
                                 port, "MEDVISION", groups)
        stored = len(list((tmp / "bridge" / "spool").rglob("*.dcm")))
    print(f"{args.associations} associations x {args.instances} instances: storescp "
          f"{total / dcmtk_s:.0f} inst/s ({received} stored), medvision bridge "
          f"{total / ours_s:.0f} inst/s ({stored} stored, fsync each); "
          f"ratio bridge/storescp {dcmtk_s / ours_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
