"""WADO-RS retrieval of a 100-instance series from a real Orthanc (DICOMweb plugin): through
the bridge's watcher (retrieve, check each instance, write it durably: fsync, rename, database
commit) against ``dicomweb-client`` alone (retrieve and decode into memory), same series, same
run, alternating; the ratio of medians is printed (above 1: the bridge's durability costs that
much more).

    .venv/bin/python bench/bench_dicomweb.py [--instances 100] [--repeats 5]

Needs ``Orthanc`` and its DICOMweb plugin (Debian: orthanc, orthanc-dicomweb).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medvision.pacs.bridge import _validate
    from medvision.pacs.config import DicomWebEndpoint, Route, WatchSource
    from medvision.pacs.store import BridgeStore
    from medvision.pacs.web import Watcher, client_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("Orthanc") is None or not PLUGIN.is_file():
        raise SystemExit("needs Orthanc and its DICOMweb plugin (apt-get install orthanc "
                         "orthanc-dicomweb)")
    root = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    http = _free_port()
    (root / "orthanc.json").write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": http, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    orthanc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        endpoint = DicomWebEndpoint(url=f"http://127.0.0.1:{http}/dicom-web/")
        client = client_for(endpoint)
        template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        study, series = generate_uid(), generate_uid()
        instances = []
        for n in range(args.instances):
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = n + 1
            instances.append(ds)
        client.store_instances(instances)
        source = WatchSource(name="bench", dicomweb=endpoint)
        routes = (Route(pipeline="any"),)

        def plain() -> int:
            return len(client.retrieve_series(study, series))

        def bridge(run: int) -> int:
            store = BridgeStore(root / f"bridge-{run}")
            watcher = Watcher(source, store, routes, quiet_period_s=0, validate=_validate)
            return watcher.retrieve_series(study, series).stored

        plain(), bridge(-1)  # warm both paths (connections, imports)
        times: dict[str, list[float]] = {"dicomweb-client": [], "bridge": []}
        for run in range(args.repeats):
            start = time.perf_counter()
            assert plain() == args.instances
            times["dicomweb-client"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert bridge(run) == args.instances
            times["bridge"].append(time.perf_counter() - start)
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, value in medians.items():
        print(f"{name:16s} median {value * 1000:8.1f} ms for {args.instances} instances "
              f"({args.instances / value:6.0f} instances/s)")
    print(f"ratio bridge / dicomweb-client: {medians['bridge'] / medians['dicomweb-client']:.2f}")


if __name__ == "__main__":
    main()
