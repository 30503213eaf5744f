"""The bridge: receiving throughput against dcmtk's storescp, and send-to-SR latency.

1. Receiving: both receive the same files in the same run: 10 concurrent associations (dcmtk
   storescu processes) of 50 instances each. The bridge writes every instance durably (fsync,
   atomic rename, SQLite row) before it answers; storescp writes files without fsync. Prints
   instances/s for each and the ratio. Analysis is off (no route matches).
2. Latency: 8 real hippocampus MR studies (DICOM series) sent at once; for each, the seconds
   from the start of sending until its SR reaches the destination (a pynetdicom Store SCP in
   this process). One analysis worker against the worker pool (``workers: 2``), same run;
   prints median and max of each and the ratio of the medians.

    .venv/bin/python bench/bench_pacs.py [--associations 10] [--instances 50] [--studies 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
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


def _wait_port(port: int, called: str) -> None:
    for _ in range(600):  # the bridge checks the called AE title: echo with the right one
        if subprocess.run([_dcmtk("echoscu"), "-aet", "STORESCU", "-aec", called, "127.0.0.1",
                           str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("server did not start")


def _serve_and_send(server: list[str], port: int, called: str,
                    groups: list[list[Path]]) -> float:
    """Start a receiving server, send every group to it at once, stop it; seconds taken."""
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, called)
        return _send_all(port, called, groups)
    finally:
        proc.kill()


REPO = Path(__file__).resolve().parents[1]


def _latencies(tmp: Path, studies: list[list[Path]], workers: int) -> list[float]:
    """Send every study at once to a bridge with ``workers``; seconds until each SR arrives."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "pacs")]
    from scripted_peer import COMPREHENSIVE_3D_SR, ScriptedPeer

    peer = ScriptedPeer().start()
    arrivals: dict[str, float] = {}
    handler = peer._on_store

    def timed(event: object) -> int:
        status = handler(event)
        ds = event.dataset  # type: ignore[attr-defined]
        if str(ds.SOPClassUID) == COMPREHENSIVE_3D_SR:
            arrivals.setdefault(str(ds.StudyInstanceUID), time.perf_counter())
        return status

    peer._on_store = timed  # type: ignore[method-assign]
    peer.stop()
    peer.start()
    port = _port()
    config = {"ae_title": "MEDVISION", "port": port, "quiet_period_s": 1.0,
              "poll_interval_s": 0.2, "workers": workers,
              "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": peer.port},
              "routes": [{"pipeline": "hippocampus-seg", "modalities": ["MR"]}]}
    folder = tmp / f"latency-{workers}"
    folder.mkdir()
    (folder / "bridge.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(BIN / "medvision"), "pacs", "listen", "--config",
                             str(folder / "bridge.yaml"), "--workdir", str(folder / "work")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, "MEDVISION")
        started = time.perf_counter()
        _send_all(port, "MEDVISION", studies)
        deadline = time.monotonic() + 600
        while len(arrivals) < len(studies) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        peer.stop()
    return sorted(t - started for t in arrivals.values())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
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
        images = sorted((args.data / "hippocampus" / "images").glob("*.nii.gz"))
        if len(images) < args.studies:
            print(f"latency: needs {args.studies} hippocampus images under {args.data}")
            return 0
        sys.path[:0] = [str(REPO / "tests")]
        from conftest import mr_series_from_nifti

        studies = [mr_series_from_nifti(image, tmp / "mr" / f"{n:02d}")
                   for n, image in enumerate(images[: args.studies])]
        results = {w: _latencies(tmp, studies, w) for w in (1, 2)}
        for workers, times in results.items():
            if len(times) < len(studies):
                print(f"latency with {workers} worker(s): only {len(times)} SRs arrived")
                return 1
            print(f"send-to-SR latency, {len(studies)} studies at once, {workers} worker(s): "
                  f"median {statistics.median(times):.1f} s, max {max(times):.1f} s")
        print(f"ratio of medians, 1 worker / 2 workers: "
              f"{statistics.median(results[1]) / statistics.median(results[2]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
