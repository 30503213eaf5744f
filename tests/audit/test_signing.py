"""Signed checkpoints and anchors: a log rewritten with recomputed hashes is caught.

Each attack works on a copy of a real signed log, the way an attacker with write access to the
log's folder (but not to the signing key, unless said) would do it: drop the guard triggers,
change rows, recompute every hash and rewrite the head file.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from medvision.audit import AuditLog, Auditor, AuditRecord, Pseudonymizer, Signer, Verifier, keygen
from medvision.audit.log import GENESIS, _chain_hash
from medvision.audit.signing import read_anchors, write_anchor
from medvision.cli.main import main
from medvision.errors import AuditError


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys")


def _records(log: AuditLog, n: int, start: int = 0) -> None:
    auditor = Auditor(log, Pseudonymizer(b"k" * 32), actor={"user": "tester", "host": "h"})
    for i in range(start, start + n):
        auditor.record(AuditRecord(action="analyze", status="ok", actor=auditor.actor,
                                   study_key=f"s{i}", result={"label": "NORMAL", "positive": False},
                                   pipeline={"name": "p", "version": "1", "weights_sha256": "a" * 64}))


def _signed_log(tmp_path: Path, private: Path, n: int = 6) -> AuditLog:
    log = AuditLog(tmp_path / "log" / "audit.sqlite", signer=Signer.from_file(private))
    _records(log, n)
    return log


def _copy(log: AuditLog, folder: Path) -> AuditLog:
    folder.mkdir()
    for path in (log.path, log.head_path):
        shutil.copy(path, folder / path.name)
    return AuditLog(folder / log.path.name)


def _sql(log: AuditLog, *statements: tuple[str, tuple]) -> None:
    con = sqlite3.connect(log.path)
    for trigger in ("records_no_update", "records_no_delete", "checkpoints_no_update",
                    "checkpoints_no_delete"):
        con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for sql, params in statements:
        con.execute(sql, params)
    con.commit()
    con.close()


def _rewrite(log: AuditLog, seq: int, label: str) -> None:
    """Change one record's result, then recompute every hash after it and the head."""
    rows = list(log.rows())
    prev, statements = GENESIS, []
    for s, time, payload, _prev, _digest in rows:
        if s == seq:
            data = json.loads(payload)
            data["result"]["label"] = label
            payload = json.dumps(data, sort_keys=True, separators=(",", ":"))
        digest = _chain_hash(prev, s, time, payload)
        statements.append(("UPDATE records SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                           (payload, prev, digest, s)))
        prev = digest
    _sql(log, *statements)
    log.head_path.write_text(json.dumps({"records": len(rows), "hash": prev}))


def _resign(log: AuditLog, signer: Signer) -> None:
    """Sign every record of a rewritten log with ``signer``."""
    statements = []
    for seq, time, _payload, _prev, digest in log.rows():
        cp = signer.sign(seq, digest, time)
        statements.append(("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                           (cp.seq, cp.hash, cp.time, cp.key_id, cp.signature)))
    _sql(log, *statements)
    log.head_path.write_text(json.dumps(cp.as_dict()))


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert private.name == "audit-signing.key" and public.name == "audit-signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes() and b"PRIVATE KEY" in private.read_bytes()
    with pytest.raises(AuditError, match="never overwritten"):
        keygen(private.parent)
    private.chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        Signer.from_file(private)


def test_signed_log_verifies_every_checkpoint(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    log = _signed_log(tmp_path, keys[0])
    result = log.verify(verifier=Verifier.from_file(keys[1]))
    assert result.ok and result.records == 6 and result.checkpoints == 6
    head = json.loads(log.head_path.read_text())
    assert head["records"] == 6 and head["signature"]
    unsigned = log.verify()
    assert unsigned.ok and "not checked" in unsigned.notes[0]


def test_full_rewrite_with_recomputed_hashes_is_caught_only_by_the_signatures(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    copy = _copy(_signed_log(tmp_path, keys[0]), tmp_path / "copy")
    _rewrite(copy, 3, "PNEUMONIA")
    assert copy.verify().ok  # the hash chain alone is fooled: every hash was recomputed
    result = copy.verify(verifier=Verifier.from_file(keys[1]))
    assert not result.ok and result.first_bad == 3
    assert "does not match its signed checkpoint" in result.problem


def test_rewrite_that_also_removes_the_checkpoints_is_caught(tmp_path: Path,
                                                            keys: tuple[Path, Path]) -> None:
    copy = _copy(_signed_log(tmp_path, keys[0]), tmp_path / "copy")
    _rewrite(copy, 2, "PNEUMONIA")
    _sql(copy, ("DELETE FROM checkpoints", ()))
    result = copy.verify(verifier=Verifier.from_file(keys[1]))
    assert not result.ok and "no signed checkpoint" in result.problem


def test_rewrite_re_signed_with_the_attackers_own_key_is_caught(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    copy = _copy(_signed_log(tmp_path, keys[0]), tmp_path / "copy")
    _rewrite(copy, 2, "PNEUMONIA")
    _sql(copy, ("DELETE FROM checkpoints", ()))
    _resign(copy, Signer.from_file(keygen(tmp_path / "forger")[0]))
    result = copy.verify(verifier=Verifier.from_file(keys[1]))
    assert not result.ok and "not by the given public key" in result.problem


def test_forged_signature_bytes_are_caught(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    copy = _copy(_signed_log(tmp_path, keys[0]), tmp_path / "copy")
    _rewrite(copy, 4, "PNEUMONIA")
    statements = []
    for checkpoint in copy.checkpoints():  # keep the key id, re-point the hashes
        digest = next(r[4] for r in copy.rows() if r[0] == checkpoint.seq)
        statements.append(("UPDATE checkpoints SET hash = ? WHERE seq = ?",
                           (digest, checkpoint.seq)))
    _sql(copy, *statements)
    result = copy.verify(verifier=Verifier.from_file(keys[1]))
    assert not result.ok and result.first_bad == 4 and "signature is invalid" in result.problem


@pytest.mark.parametrize("attack", ["edit", "delete", "reorder", "truncate"])
def test_every_tampering_is_caught_with_the_public_key_and_anchors(
        tmp_path: Path, keys: tuple[Path, Path], attack: str) -> None:
    log = _signed_log(tmp_path, keys[0])
    write_anchor(log.latest_checkpoint(), tmp_path / "anchors")  # type: ignore[arg-type]
    copy = _copy(log, tmp_path / "copy")
    if attack == "edit":
        _sql(copy, ("UPDATE records SET payload = '{}' WHERE seq = 2", ()))
    elif attack == "delete":
        _sql(copy, ("DELETE FROM records WHERE seq = 3", ()))
    elif attack == "reorder":
        rows = {r[0]: r for r in copy.rows()}
        _sql(copy, ("DELETE FROM records WHERE seq IN (2, 3)", ()),
             ("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (2, *rows[3][1:])),
             ("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (3, *rows[2][1:])))
    else:  # cut the last two records with their checkpoints; the head re-pointed
        _sql(copy, ("DELETE FROM records WHERE seq > 4", ()),
             ("DELETE FROM checkpoints WHERE seq > 4", ()))
        copy.head_path.write_text(json.dumps(copy.latest_checkpoint().as_dict()))  # type: ignore[union-attr]
    verifier = Verifier.from_file(keys[1])
    result = copy.verify(verifier=verifier, anchors=read_anchors(tmp_path / "anchors"))
    assert not result.ok, attack
    if attack == "truncate":
        # a consistent, signed, shorter log: only the anchor kept elsewhere tells
        assert copy.verify(verifier=verifier).ok
        assert "removed after anchoring" in result.problem


def test_key_holder_rewrite_is_caught_by_the_anchor(tmp_path: Path,
                                                    keys: tuple[Path, Path]) -> None:
    log = _signed_log(tmp_path, keys[0])
    write_anchor(log.latest_checkpoint(), tmp_path / "anchors")  # type: ignore[arg-type]
    copy = _copy(log, tmp_path / "copy")
    _rewrite(copy, 2, "PNEUMONIA")
    _sql(copy, ("DELETE FROM checkpoints", ()))
    _resign(copy, Signer.from_file(keys[0]))
    verifier = Verifier.from_file(keys[1])
    assert copy.verify(verifier=verifier).ok  # re-signed with the real key: consistent
    result = copy.verify(verifier=verifier, anchors=read_anchors(tmp_path / "anchors"))
    assert not result.ok and "differs from the anchored head" in result.problem


def test_a_signed_log_refuses_unsigned_records(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    log = _signed_log(tmp_path, keys[0], n=2)
    with pytest.raises(AuditError, match="signing key"):
        _records(AuditLog(log.path), 1)
    assert AuditLog(log.path).verify(verifier=Verifier.from_file(keys[1])).ok


def test_cli_keygen_analyze_verify_anchor(tmp_path: Path, shared_data: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["audit", "keygen", str(keys)]) == 0
    log = tmp_path / "audit" / "audit.sqlite"
    images = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:2]
    assert main(["analyze", *map(str, images), "--pipeline", "chest-xray-pneumonia",
                 "-o", str(tmp_path / "out"), "--audit-log", str(log),
                 "--signing-key", str(keys / "audit-signing.key")]) == 0
    public = str(keys / "audit-signing.pub")
    capsys.readouterr()
    assert main(["audit", "verify", "--log", str(log), "--public-key", public]) == 0
    assert "2 records, chain intact, 2 signed checkpoint(s) verified" in capsys.readouterr().out
    anchors = tmp_path / "anchors"
    assert main(["audit", "anchor", "--log", str(log), "--to", str(anchors),
                 "--public-key", public]) == 0
    assert len(list(anchors.glob("checkpoint-*.json"))) == 1
    copy = _copy(AuditLog(log), tmp_path / "copy")
    _rewrite(copy, 1, "PNEUMONIA")
    capsys.readouterr()
    assert main(["audit", "verify", "--log", str(copy.path)]) == 0  # chain alone: fooled
    assert main(["audit", "verify", "--log", str(copy.path), "--public-key", public]) == 1
    assert "BROKEN at record 1" in capsys.readouterr().out
    assert main(["audit", "verify", "--log", str(log), "--public-key", public,
                 "--anchors", str(anchors)]) == 0
    assert "consistent with 1 anchor(s)" in capsys.readouterr().out


def test_anchor_refuses_a_log_without_a_signed_checkpoint(tmp_path: Path, capsys) -> None:
    log = AuditLog(tmp_path / "log" / "audit.sqlite")
    _records(log, 3)
    assert main(["audit", "anchor", "--audit-log", str(log.path), "--to",
                 str(tmp_path / "anchors")]) == 1
    assert "no signed checkpoint to anchor" in capsys.readouterr().err
    assert not (tmp_path / "anchors").exists() or not list((tmp_path / "anchors").iterdir())


def test_anchor_refuses_a_log_that_fails_verification(tmp_path: Path, keys: tuple[Path, Path],
                                                      capsys) -> None:
    private, public = keys
    log = _signed_log(tmp_path, private)
    _sql(log, ("UPDATE records SET payload = replace(payload, 'NORMAL', 'PNEUMONIA') "
               "WHERE seq = 2", ()))
    assert main(["audit", "anchor", "--audit-log", str(log.path), "--to",
                 str(tmp_path / "anchors"), "--public-key", str(public)]) == 1
    assert "not anchoring a log that fails verification" in capsys.readouterr().err
    assert not (tmp_path / "anchors").exists() or not list((tmp_path / "anchors").iterdir())
