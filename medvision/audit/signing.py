"""Ed25519 keys and signed checkpoints of the audit log's head.

A hash chain shows that records were not changed *relative to each other*; anyone who can
write the file can still rewrite every record and recompute every hash. A *signed checkpoint*
(the head's sequence number and hash, signed with a key kept apart from the log) closes that
gap, the way Certificate Transparency logs sign tree heads (RFC 9162): without the private key
a rewritten log cannot carry valid signatures. Anchoring a checkpoint somewhere the log's
writer cannot change (see :func:`write_anchor`) closes the remaining gap, truncation or
rewriting by someone who holds the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.errors import AuditError

__all__ = ["Checkpoint", "Signer", "Verifier", "keygen", "read_anchors", "write_anchor"]

PRIVATE_NAME = "audit-signing.key"
PUBLIC_NAME = "audit-signing.pub"
_DOMAIN = "medvision-audit-checkpoint/v1"


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: "the log had ``seq`` records, the last with hash ``hash``"."""

    seq: int
    hash: str
    time: str
    key_id: str
    signature: str

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return checkpoint_message(self.seq, self.hash, self.time)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (anchors and the head sidecar)."""
        return {"records": self.seq, "hash": self.hash, "time": self.time,
                "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        """Read the JSON form; raises AuditError when fields are missing."""
        try:
            return cls(seq=int(data["records"]), hash=str(data["hash"]), time=str(data["time"]),
                       key_id=str(data["key_id"]), signature=str(data["signature"]))
        except (KeyError, TypeError, ValueError) as e:
            raise AuditError(f"not a signed checkpoint ({e})") from e


def checkpoint_message(seq: int, digest: str, time: str) -> bytes:
    """Domain-separated message for a checkpoint."""
    return f"{_DOMAIN}\n{seq}\n{digest}\n{time}\n".encode()


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public.public_bytes(encoding=serialization.Encoding.Raw,
                                     format=serialization.PublicFormat.Raw))


class Signer:
    """Signs checkpoints with an Ed25519 private key read from a PEM file (mode 0600)."""

    def __init__(self, private: Any) -> None:
        self._private = private
        self.key_id = _key_id(_public_raw(private.public_key()))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Load the key; refuses a file that others can read.

        Raises:
            AuditError: missing, unreadable, not Ed25519, or readable by group/others.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key_path = Path(path)
        try:
            mode = key_path.stat().st_mode
            data = key_path.read_bytes()
        except OSError as e:
            raise AuditError(f"{key_path}: cannot read the audit signing key ({e})") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuditError(f"{key_path}: the signing key is readable by others (mode "
                             f"{stat.S_IMODE(mode):o}); run chmod 600 on it")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise AuditError(f"{key_path}: not a PEM private key ({e})") from e
        if not isinstance(private, Ed25519PrivateKey):
            raise AuditError(f"{key_path}: not an Ed25519 key")
        return cls(private)

    def sign(self, seq: int, digest: str, time: str) -> Checkpoint:
        """A checkpoint of the head ``(seq, digest)`` at ``time``."""
        signature = self._private.sign(checkpoint_message(seq, digest, time))
        return Checkpoint(seq=seq, hash=digest, time=time, key_id=self.key_id,
                          signature=base64.b64encode(signature).decode())


class Verifier:
    """Checks checkpoints against an Ed25519 public key (PEM)."""

    def __init__(self, public: Any) -> None:
        self._public = public
        self.key_id = _key_id(_public_raw(public))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Verifier:
        """Load a public key written by :func:`keygen`."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            public = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as e:
            raise AuditError(f"{path}: cannot read the public key ({e})") from e
        if not isinstance(public, Ed25519PublicKey):
            raise AuditError(f"{path}: not an Ed25519 public key")
        return cls(public)

    def problem(self, checkpoint: Checkpoint) -> str | None:
        """Why ``checkpoint`` does not verify, or ``None`` when it does."""
        from cryptography.exceptions import InvalidSignature

        if checkpoint.key_id != self.key_id:
            return (f"signed by key {checkpoint.key_id}, not by the given public key "
                    f"{self.key_id}")
        try:
            self._public.verify(base64.b64decode(checkpoint.signature, validate=True),
                                checkpoint.message())
        except (InvalidSignature, ValueError):
            return "its signature is invalid"
        return None


def keygen(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair: ``audit-signing.key`` (0600) and ``audit-signing.pub``.

    Raises:
        AuditError: a key already exists there (never overwritten) or cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root = Path(folder)
    private_path, public_path = root / PRIVATE_NAME, root / PUBLIC_NAME
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(encoding=serialization.Encoding.PEM,
                                format=serialization.PrivateFormat.PKCS8,
                                encryption_algorithm=serialization.NoEncryption())
    public = private.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise AuditError(f"{private_path} exists; a signing key is never overwritten") from e
    except OSError as e:
        raise AuditError(f"{private_path}: cannot create the key ({e})") from e
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    public_path.write_bytes(public)
    return private_path, public_path


def write_anchor(checkpoint: Checkpoint, folder: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` as a new file in ``folder``; an anchor is never overwritten.

    Raises:
        AuditError: the folder cannot be written.
    """
    root = Path(folder)
    path = root / f"checkpoint-{checkpoint.seq:010d}-{checkpoint.hash[:16]}.json"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path  # this very head is anchored already
    except OSError as e:
        raise AuditError(f"{path}: cannot write the anchor ({e})") from e
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(checkpoint.as_dict(), indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_anchors(folder: str | os.PathLike[str]) -> list[tuple[Path, Checkpoint]]:
    """Every anchored checkpoint in ``folder``, oldest first.

    Raises:
        AuditError: the folder is missing or an anchor file is unreadable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AuditError(f"{root}: no anchor folder here")
    out = []
    for path in sorted(root.glob("checkpoint-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise AuditError(f"{path}: unreadable anchor ({e})") from e
        out.append((path, Checkpoint.from_dict(data)))
    return sorted(out, key=lambda pc: pc[1].seq)
