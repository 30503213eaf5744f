"""Start-up time of the ``medvision`` command against a bare Python start, same run.

Each command runs 10 times in a fresh process; the medians are compared with
``python -c pass``. Targets: ``--help`` and ``--version`` under 0.3 s; ``info`` on a DICOM
series and ``audit verify`` on a 1,000-record log without importing torch (checked by the
tests; here only timed).

    .venv/bin/python bench/bench_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _median(command: list[str], runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.sqlite"
        subprocess.run([sys.executable, "-c", (
            "from pathlib import Path\n"
            "from medvision.audit import AuditLog, Auditor, AuditRecord, Pseudonymizer\n"
            f"a = Auditor(AuditLog(Path({str(log)!r})), Pseudonymizer(b'k' * 32), "
            "actor={'user': 'bench'})\n"
            "for _ in range(1000):\n"
            "    a.record(AuditRecord(action='analyze', status='ok', actor=a.actor))\n")],
            check=True)
        medvision = str(BIN / "medvision")
        base = _median([sys.executable, "-c", "pass"])
        rows = {
            "medvision --help": _median([medvision, "--help"]),
            "medvision --version": _median([medvision, "--version"]),
            "medvision info (DICOM series)": _median(
                [medvision, "info", str(REPO / "sample_data" / "ct_phantom")]),
            "medvision audit verify (1,000 records)": _median(
                [medvision, "audit", "verify", "--audit-log", str(log)]),
            "medvision pipelines list": _median([medvision, "pipelines", "list"]),
        }
    print(f"python -c pass: {base * 1000:.0f} ms")
    for name, seconds in rows.items():
        print(f"{name}: {seconds * 1000:.0f} ms, {seconds / base:.1f}x a bare Python start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
