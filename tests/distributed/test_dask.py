"""Analyze on a real Dask cluster: scheduler and workers as separate processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from medvision.audit import AuditLog
from medvision.cli.main import main

from conftest import wait_until

pytestmark = pytest.mark.integration

DASK = str(Path(sys.executable).parent / "dask")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler on a free loopback port and two single-threaded workers, no nannies."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        wait_until(scheduler_file.exists, 60, "scheduler did not start", poll=0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny",
                                     "--no-dashboard", "--host", "127.0.0.1",
                                     "--local-directory", str(tmp_path / f"w{i}")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                   for i in range(2)]
        procs += workers
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def studies(shared_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        for path in sorted((shared_data / "chest_xray" / "train" / name).glob("*.jpeg"))[:10]:
            shutil.copy(path, folder / path.name)
    return folder


def _comparable(out: Path) -> dict[str, dict]:
    reports = {}
    for path in sorted(out.glob("*/report.json")):
        report = json.loads(path.read_text())
        reports[path.parent.name] = {
            "status": report["status"], "label": (report["prediction"] or {}).get("label"),
            "probabilities": (report["prediction"] or {}).get("probabilities"),
            "input": report["input"], "saliency": report["saliency"]["files"],
        }
    return reports


def test_cluster_matches_in_process(cluster, studies: Path, tmp_path: Path) -> None:
    address, _ = cluster
    local, remote = tmp_path / "local", tmp_path / "remote"
    for out, extra in ((local, []), (remote, ["--scheduler", address])):
        assert main(["analyze", str(studies), "--pipeline", "chest-xray-pneumonia", "-o",
                     str(out), "--audit-log", str(out / "audit.sqlite"), *extra]) == 0
    ours, theirs = _comparable(local), _comparable(remote)
    assert len(ours) == 20 and ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key]["label"] == theirs[key]["label"]
        assert ours[key]["input"] == theirs[key]["input"]
        for cls, p in ours[key]["probabilities"].items():
            assert theirs[key]["probabilities"][cls] == pytest.approx(p, abs=1e-5)
    records = {o: [r["result"]["study"] for r in AuditLog(o / "audit.sqlite").records()]
               for o in (local, remote)}
    assert sorted(records[local]) == sorted(records[remote]) == sorted(ours)


def test_worker_killed_mid_run_loses_nothing(cluster, studies: Path, tmp_path: Path) -> None:
    address, workers = cluster
    out = tmp_path / "out"
    log = out / "audit.sqlite"
    command = [str(Path(sys.executable).parent / "medvision"), "analyze", str(studies),
               "--pipeline", "chest-xray-pneumonia", "-o", str(out), "--audit-log", str(log),
               "--scheduler", address]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(list(out.glob("*/report.json"))) >= 3, 300, "no study finished", poll=0.2)
        workers[0].send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "20 studies: 20 ok" in stdout
    reports = list(out.glob("*/report.json"))
    assert len(reports) == 20
    assert not list(out.glob(".*.partial"))
    studies_in_log = [r["result"]["study"] for r in AuditLog(log).records()]
    assert len(studies_in_log) == 20 == len(set(studies_in_log))
    assert AuditLog(log).verify().ok
