"""The package and its command: pipelines found by entry point or folder, light start-up,
missing extras named, the common options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medvision.cli.main import main

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _run_python(code: str, cwd: Path) -> str:
    return subprocess.run([PYTHON, "-c", code], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


def test_pipelines_list_and_show_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run([str(Path(PYTHON).parent / "medvision"), "pipelines", "list",
                          "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert {"chest-xray-pneumonia", "hippocampus-seg", "adrenal-3d"} <= set(rows)
    chest = rows["chest-xray-pneumonia"]
    assert chest["version"] and chest["task"] == "classification" and chest["weights"]
    assert "entry point" in chest["source"] and chest["summary"]
    card = subprocess.run([str(Path(PYTHON).parent / "medvision"), "pipelines", "show",
                           "hippocampus-seg"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout
    assert card.startswith("#") and "Dice" in card


def test_user_pipelines_folder_by_option_and_environment(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    user = tmp_path / "mine"
    shutil.copytree(REPO / "pipelines" / "adrenal-3d", user / "my-adrenal")
    assert main(["pipelines", "list", "--json", "--pipelines-dir", str(user)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["my-adrenal"]["source"] == f"folder {user}"
    monkeypatch.setenv("MEDVISION_PIPELINES", str(user))
    assert main(["pipelines", "list", "--json"]) == 0
    assert "my-adrenal" in {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert main(["pipelines", "show", "no-such-pipeline"]) == 2
    assert "no pipeline 'no-such-pipeline'" in capsys.readouterr().err
    assert main(["pipelines", "list", "--pipelines-dir", str(tmp_path / "typo")]) == 0
    assert f"{tmp_path / 'typo'}: no such pipelines folder" in capsys.readouterr().err


def test_info_and_audit_verify_do_not_import_torch(tmp_path: Path) -> None:
    log = tmp_path / "audit.sqlite"
    code = f"""
import contextlib, io, sys
from pathlib import Path
from medvision.audit import AuditLog, Auditor, AuditRecord, Pseudonymizer
auditor = Auditor(AuditLog(Path({str(log)!r})), Pseudonymizer(b"k" * 32), actor={{"user": "u"}})
for _ in range(1000):
    auditor.record(AuditRecord(action="analyze", status="ok", actor=auditor.actor))
from medvision.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["info", {str(REPO / "sample_data" / "ct_phantom")!r}]) == 0
    assert main(["audit", "verify", "--audit-log", {str(log)!r}, "--json"]) == 0
print(sorted(m for m in ("torch", "monai", "captum", "matplotlib", "SimpleITK", "pynetdicom",
                         "dask") if m in sys.modules))
"""
    assert _run_python(code, tmp_path).strip() == "[]"


def test_help_and_version_import_nothing_heavy(tmp_path: Path) -> None:
    code = """
import contextlib, io, sys
from medvision.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "monai", "numpy", "pydicom", "pydantic") if m in sys.modules))
"""
    assert _run_python(code, tmp_path).strip() == "[]"


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pynetdicom" else real(name, *a))
    config = REPO / "docs" / "examples" / "bridge.yaml"
    assert main(["pacs", "listen", "--config", str(config), "--workdir", str(tmp_path)]) == 2
    assert "pip install 'medvision[pacs]'" in capsys.readouterr().err


def test_common_options_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pipelines", "list", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(REPO / "sample_data" / "ct_phantom"), "-v", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["series"]


def test_every_help_page_reads_as_written() -> None:
    """Each command's --help renders (no stray format codes such as a doubled percent sign)."""
    from medvision.cli.main import _subparsers, build_parser

    pages = [build_parser(), *_subparsers(build_parser())]
    assert len(pages) > 20
    for parser in pages:
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, parser.prog


def test_python_dash_m_is_the_command(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-m", "medvision", "--version"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("medvision ")


def test_analyze_json_on_stdout(shared_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    assert main(["analyze", str(image), "--pipeline", "chest-xray-pneumonia", "-o",
                 str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sum(result["counts"].values()) == 1
    (study,) = result["studies"]
    assert study["status"] in ("ok", "flagged") and study["label"] in ("NORMAL", "PNEUMONIA")


def test_pipeline_is_named_the_same_way_everywhere(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # --pipeline for train/evaluate/export as for analyze; a bare name still works
    assert main(["export", "--pipeline", "no-such-pipeline"]) == 2
    assert "no pipeline 'no-such-pipeline'" in capsys.readouterr().err
    assert main(["export", "a", "--pipeline", "b"]) == 2
    assert "two pipelines given" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "-o", str(tmp_path / "run")]) == 2
    assert "no pipeline given" in capsys.readouterr().err


def test_audit_report_to_stdout_with_format_from_extension(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    from medvision.audit import AuditLog, Auditor, AuditRecord, Pseudonymizer

    log = AuditLog(tmp_path / "audit.sqlite")
    auditor = Auditor(log, Pseudonymizer(b"k" * 32), actor={"user": "u"})
    auditor.record(AuditRecord(action="analyze", status="ok", actor=auditor.actor))
    assert main(["audit", "report", "--audit-log", str(log.path), "--format", "json",
                 "-o", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"] == "intact"
    assert main(["audit", "report", "--audit-log", str(log.path), "-o",
                 str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith(("seq", "time", "action", "study"))


def test_public_api_names_resolve_whatever_was_imported_first(tmp_path: Path) -> None:
    code = """
import sys
import medvision
assert "torch" not in sys.modules  # importing the package loads nothing heavy
import medvision.analyze.batch  # the sub-package of the same name as the function
from medvision import Predictor, analyze, load_pipeline, read_volume
assert callable(medvision.analyze) and medvision.analyze is analyze
assert analyze.__module__ == "medvision.analyze.batch"
print(sorted(n for n in ("Predictor", "load_pipeline", "read_volume") if callable(getattr(medvision, n))))
"""
    assert _run_python(code, tmp_path).strip() == "['Predictor', 'load_pipeline', 'read_volume']"
