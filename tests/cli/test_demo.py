"""`make demo` on the bundled sample data, as a newcomer sees it: each shipped pipeline gives
a real finding on its real case (with its saliency, volumes or counts), and the phantom is
flagged out of distribution. The Makefile's commands are read and run as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from medvision.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def _demo_commands() -> list[list[str]]:
    text = (REPO / "Makefile").read_text()
    block = text[text.index("\ndemo:"):text.index("\n\n", text.index("\ndemo:") + 1)]
    block = block.replace("\\\n", " ")
    return [shlex.split(line.strip().removeprefix("$(BIN)/medvision "))
            for line in block.splitlines() if line.strip().startswith("$(BIN)/medvision analyze")]


def _reports(out: Path) -> dict[str, dict[str, object]]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}


def test_the_demo_shows_real_findings_and_one_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    monkeypatch.chdir(REPO)  # the Makefile's paths are the repository's
    commands = _demo_commands()
    assert len(commands) == 4
    for command in commands:
        args = [a.replace("$(DEMO_OUT)", str(tmp_path)) for a in command]
        assert main(args) == 0, args  # ok or flagged: the demo succeeds

    chest = _reports(tmp_path / "chest")["chest_pneumonia"]
    assert chest["status"] == "ok" and chest["prediction"]["label"] == "PNEUMONIA"
    assert chest["prediction"]["finding"].startswith("PNEUMONIA (probability 0.9")
    assert chest["saliency"]["files"]["png"]  # the finding comes with its saliency

    hippocampus = _reports(tmp_path / "hippocampus")
    case = hippocampus["hippocampus_003"]
    assert case["status"] == "ok"
    volumes = case["prediction"]["volumes_ml"]
    assert 1.0 < volumes["anterior"] < 3.5 and 1.0 < volumes["posterior"] < 3.5
    assert re.match(r"Segmented anterior hippocampus \(\d\.\d\d mL\) and posterior hippocampus",
                    case["prediction"]["finding"])
    phantom = hippocampus["mr_phantom"]
    assert phantom["status"] == "flagged" and phantom["qc"]["out_of_distribution"] is True

    cells = _reports(tmp_path / "bccd")["bccd_BloodImage_00003"]
    counts = cells["prediction"]["counts"]
    assert cells["status"] == "ok" and counts["WBC"] == 1 and counts["RBC"] >= 10
    assert cells["prediction"]["finding"].startswith("Detected ")

    adrenal = _reports(tmp_path / "adrenal")["adrenal_val_035"]
    assert adrenal["status"] == "ok" and adrenal["prediction"]["label"] == "hyperplasia"
