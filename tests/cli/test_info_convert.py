"""The ``medvision info`` and ``convert`` commands, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medvision.cli.main import main
from medvision.io import read_volume

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"


def test_info_json_lists_series_with_geometry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(SAMPLE / "ct_phantom"), str(SAMPLE / "mr_phantom.nii.gz"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_format = {item["format"]: item for item in report["series"]}
    ct = by_format["dicom"]
    assert ct["modality"] == "CT" and ct["slices"] == 30 and ct["matrix"] == [80, 80]
    assert ct["spacing"] == [3.0, 3.0, 5.0] and ct["orientation"] == "LPS"
    assert ct["transfer_syntax"] == "Explicit VR Little Endian" and ct["warnings"] == []
    assert by_format["nifti"]["shape"] == [48, 56, 40]
    assert "DEMO" not in json.dumps(report)  # no patient name in the listing


def test_info_text_shows_tilt_warning(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(shared_data / "dicom" / "ct_head_tilt")]) == 0
    out = capsys.readouterr().out
    assert "gantry tilt" in out and "28 slice(s)" in out


def test_info_on_nothing_readable_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.bin").write_bytes(b"nope")
    assert main(["info", str(tmp_path)]) == 1
    assert "not a DICOM file" in capsys.readouterr().out


def test_convert_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(SAMPLE / "ct_phantom"), "-o", str(out)]) == 0
    assert main(["convert", str(SAMPLE / "ct_phantom"), "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(SAMPLE / "ct_phantom"), "-o", str(out), "--force"]) == 0
    volume = read_volume(out)
    assert volume.spatial_shape == (80, 80, 30)


def test_convert_several_series_to_a_folder(tmp_path: Path) -> None:
    outdir = tmp_path / "all"
    assert main(["convert", str(SAMPLE / "ct_phantom"), str(SAMPLE / "mr_phantom.nii.gz"),
                 "-o", str(outdir)]) == 0
    written = sorted(p.name for p in outdir.glob("*.nii.gz"))
    assert len(written) == 2 and written[0].startswith("000_CT")


def test_convert_several_series_to_one_file_asks_which(tmp_path: Path, capsys) -> None:
    phantoms = [str(SAMPLE / "ct_phantom"), str(SAMPLE / "mr_phantom.nii.gz")]
    code = main(["convert", *phantoms, "-o", str(tmp_path / "one.nii.gz")])
    assert code == 1 and "--series" in capsys.readouterr().err
    assert main(["convert", *phantoms, "-o", str(tmp_path / "one.nii.gz"), "--series", "1"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "one.nii.gz").array,
                                  read_volume(SAMPLE / "mr_phantom.nii.gz").array)


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "medvision"
    result = subprocess.run([str(exe), "info", str(SAMPLE / "mr_phantom.nii.gz")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "48x56" in result.stdout


def test_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "medvision"
    result = subprocess.run([str(exe), "convert", str(tmp_path / "missing"), "-o", "x.nii.gz"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2  # a path that does not exist: a usage error
    assert result.stderr.startswith("medvision: error:") and "Traceback" not in result.stderr
