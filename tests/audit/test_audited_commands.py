"""Every analysis, training and evaluation leaves an audit record; no PHI leaks anywhere."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pydicom

from medvision.audit import AuditLog
from medvision.cli.main import main

from conftest import pydicom_test_files

RG1 = next(p for p in pydicom_test_files() if p.name == "RG1_UNCR.dcm")
SECRETS = {"PatientName": "Leaky^Patient^Q", "PatientID": "PID-7788-LEAK",
           "PatientBirthDate": "19420317"}


def _identified_radiograph(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(RG1)
    for key, value in SECRETS.items():
        setattr(ds, key, value)
    ds.BodyPartExamined = "CHEST"
    path = folder / "chest.dcm"
    ds.save_as(path)
    return path


def _all_text(root: Path) -> str:
    chunks = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            chunks.append(data.decode("latin-1"))
    return "\n".join(chunks)


def test_analysis_is_audited_and_leaks_no_phi(tmp_path: Path, caplog) -> None:
    source = _identified_radiograph(tmp_path / "in")
    out, audit = tmp_path / "out", tmp_path / "audit"
    caplog.set_level(logging.DEBUG)
    code = main(["--log-level", "DEBUG", "analyze", str(source), "--pipeline",
                 "chest-xray-pneumonia", "-o", str(out), "--audit-log", str(audit / "log.sqlite")])
    assert code == 0
    records = list(AuditLog(audit / "log.sqlite").records())
    assert len(records) == 1
    record = records[0]
    assert record["action"] == "analyze" and record["status"] == "flagged"  # adult CR: OOD
    assert len(record["patient_key"]) == 32 and len(record["study_key"]) == 32
    assert record["inputs"]["instances"][0]["pixel_data_sha256"]
    assert record["pipeline"]["weights_sha256"] and record["pipeline"]["config_hash"]
    study = record["result"]["study"]
    assert {o["path"] for o in record["outputs"]} >= {f"{study}/report.json",
                                                      f"{study}/saliency.nii.gz"}
    haystack = _all_text(out) + _all_text(audit) + caplog.text
    for secret in SECRETS.values():
        assert secret not in haystack
        assert secret.replace("^", " ") not in haystack


def test_unwritable_audit_log_leaves_no_result(tmp_path: Path) -> None:
    source = _identified_radiograph(tmp_path / "in")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder should be")
    out = tmp_path / "out"
    code = main(["analyze", str(source), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--audit-log", str(blocker / "log.sqlite"), "--audit-key",
                 str(tmp_path / "key")])
    assert code == 1
    assert not list(out.glob("*/report.json"))


def test_training_and_evaluation_are_audited(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "chest"
    for name in ("NORMAL", "PNEUMONIA"):
        (data / name).mkdir(parents=True)
        for path in sorted((shared_data / "chest_xray" / "train" / name).glob("*.jpeg"))[:5]:
            shutil.copy(path, data / name / path.name)
    log = tmp_path / "audit.sqlite"
    run = tmp_path / "run"
    assert main(["train", "chest-xray-pneumonia", "--data", str(data), "-o", str(run),
                 "--epochs", "1", "--audit-log", str(log)]) == 0
    assert main(["evaluate", "chest-xray-pneumonia", "--data", str(data), "-o",
                 str(tmp_path / "eval"), "--weights", str(run / "best.safetensors"),
                 "--audit-log", str(log)]) == 0
    records = list(AuditLog(log).records())
    assert [r["action"] for r in records] == ["train", "evaluate"]
    assert records[0]["inputs"]["train"]["items"] + records[0]["inputs"]["val"]["items"] == 10
    assert any(o["path"].endswith("best.safetensors") for o in records[0]["outputs"])
    assert "accuracy" in records[1]["result"]
    assert AuditLog(log).verify().ok


def test_include_phi_puts_identity_in_the_report_only_on_request(tmp_path: Path) -> None:
    source = _identified_radiograph(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["analyze", str(source), "--pipeline", "chest-xray-pneumonia", "-o", str(out),
                 "--include-phi"]) == 0
    report = json.loads(next(out.glob("*/report.json")).read_text())
    assert report["input"]["phi"]["PatientID"] == SECRETS["PatientID"]
