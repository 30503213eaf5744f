"""The hash-chained audit log: tampering of every kind is detected and named."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from medvision.audit import AuditLog, Auditor, AuditRecord, Pseudonymizer
from medvision.cli.main import main
from medvision.errors import AuditError


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "audit.sqlite")
    auditor = Auditor(log, Pseudonymizer(b"k" * 32), actor={"user": "tester", "host": "h"})
    for i in range(n):
        auditor.record(AuditRecord(action="analyze", status="ok", actor=auditor.actor,
                                   study_key=f"s{i}", result={"label": "x", "positive": i % 2 == 0},
                                   pipeline={"name": "p", "version": "1", "weights_sha256": "a" * 64},
                                   durations={"total_s": 0.1 * (i + 1)}))
    return log


def _raw(log: AuditLog, sql: str, *params: object) -> None:
    """Tamper as an attacker would: drop the guard triggers, then write."""
    con = sqlite3.connect(log.path)
    con.execute("DROP TRIGGER IF EXISTS records_no_update")
    con.execute("DROP TRIGGER IF EXISTS records_no_delete")
    con.execute(sql, params)
    con.commit()
    con.close()


def test_untouched_log_verifies(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path)
    result = log.verify()
    assert result.ok and result.records == 5
    assert main(["audit", "verify", "--log", str(log.path)]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out


def test_library_refuses_updates_and_deletes(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    con = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE records SET payload = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM records WHERE seq = 1")
    con.close()


def test_edited_field_is_named(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path)
    row = next(r for r in log.rows() if r[0] == 3)
    payload = json.loads(row[2])
    payload["result"]["label"] = "tampered"
    _raw(log, "UPDATE records SET payload = ? WHERE seq = 3", json.dumps(payload))
    result = log.verify()
    assert not result.ok and result.first_bad == 3 and "modified" in result.problem
    assert main(["audit", "verify", "--log", str(log.path)]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().out


def test_deleted_record_is_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _raw(log, "DELETE FROM records WHERE seq = 2")
    result = log.verify()
    assert not result.ok and result.first_bad == 3


def test_deleted_last_record_is_caught_by_the_head(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _raw(log, "DELETE FROM records WHERE seq = 5")
    result = log.verify()
    assert not result.ok and result.first_bad == 5 and "removed at the end" in result.problem


def test_swapped_records_are_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    rows = {r[0]: r for r in log.rows()}
    _raw(log, "DELETE FROM records WHERE seq IN (2, 3)")
    con = sqlite3.connect(log.path)
    for seq, source in ((2, rows[3]), (3, rows[2])):
        con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (seq, *source[1:]))
    con.commit()
    con.close()
    result = log.verify()
    assert not result.ok and result.first_bad == 2


def test_inserted_record_is_named(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    rows = {r[0]: r for r in log.rows()}
    forged = (4, rows[3][1], rows[3][2], rows[3][4], "f" * 64)
    con = sqlite3.connect(log.path)
    con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)", forged)
    con.commit()
    con.close()
    result = log.verify()
    assert not result.ok and result.first_bad == 4


def test_unwritable_log_is_an_audit_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError):
        AuditLog(blocker / "audit.sqlite").append("2026-01-01T00:00:00+00:00", {"a": 1})


def test_pseudonyms_are_keyed_and_stable(tmp_path: Path) -> None:
    key_file = tmp_path / "k" / "audit.key"
    one = Pseudonymizer.from_file(key_file)
    assert (key_file.stat().st_mode & 0o777) == 0o600
    again = Pseudonymizer.from_file(key_file)
    assert one.pseudonym("patient", "MV-1") == again.pseudonym("patient", "MV-1")
    other = Pseudonymizer(b"another-key-of-32-bytes-length!!")
    assert other.pseudonym("patient", "MV-1") != one.pseudonym("patient", "MV-1")
    assert key_file.read_text().strip() not in repr(one)


@pytest.mark.parametrize("fmt", ["html", "csv", "json"])
def test_audit_report_formats(tmp_path: Path, fmt: str) -> None:
    log = _log(tmp_path)
    out = tmp_path / f"report.{fmt}"
    assert main(["audit", "report", "--log", str(log.path), "--format", fmt, "-o", str(out)]) == 0
    text = out.read_text()
    if fmt == "json":
        summary = json.loads(text)
        assert summary["by_status"] == {"ok": 5}
        rates = next(iter(summary["positive_rate"].values()))
        day = next(iter(rates.values()))
        assert day["positive"] == 3 and day["total"] == 5
        latency = next(iter(summary["latency_s"].values()))
        assert latency["p50"] == pytest.approx(0.3)
        assert [s["study_key"] for s in summary["studies"]] == [f"s{i}" for i in range(5)]
    elif fmt == "csv":
        assert text.count("\n") == 6 and "study_key" in text
    else:
        assert "Chain verification: <strong>intact" in text and "data:image/png;base64," in text
