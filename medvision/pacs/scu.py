"""DICOM client operations: C-ECHO, C-STORE and C-FIND (pynetdicom)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medvision.errors import PacsError
from medvision.pacs.config import Peer

__all__ = ["echo", "find", "store"]

log = logging.getLogger(__name__)


def _associate(peer: Peer, calling_ae: str, contexts: Any) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise PacsError(f"{peer.ae_title}@{peer.host}:{peer.port}: association rejected or "
                        "aborted (check AE titles, host and port)")
    return assoc


def echo(peer: Peer, *, calling_ae: str = "MEDVISION") -> int:
    """C-ECHO; returns the status (0 is success)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    assoc = _associate(peer, calling_ae, [Verification])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status:
        raise PacsError(f"{peer.ae_title}: no response to C-ECHO")
    return int(status.Status)


def store(peer: Peer, paths: Iterable[str | os.PathLike[str]], *,
          calling_ae: str = "MEDVISION") -> dict[str, int]:
    """C-STORE each file on one association; returns ``{path: status}``.

    Raises:
        PacsError: the association failed (no status for any file).
    """
    import pydicom

    datasets = []
    for path in paths:
        try:
            datasets.append((str(path), pydicom.dcmread(path)))
        except (pydicom.errors.InvalidDicomError, OSError) as e:
            raise PacsError(f"{path}: cannot read for sending ({e})") from e
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                       for _, ds in datasets})
    requested: list[Any] = []
    for sop_class in sorted({c for c, _ in contexts}):
        syntaxes = sorted({t for c, t in contexts if c == sop_class})
        syntaxes += [s for s in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") if s not in syntaxes]
        requested.append((sop_class, syntaxes))
    assoc = _associate(peer, calling_ae, requested)
    statuses: dict[str, int] = {}
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            statuses[path] = int(status.Status) if status else -1
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def find(peer: Peer, query: dict[str, str], *, level: str = "STUDY",
         calling_ae: str = "MEDVISION") -> list[dict[str, str]]:
    """C-FIND (Study Root); returns the matches as ``{keyword: value}``."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in query.items():
        setattr(identifier, keyword, value)
    assoc = _associate(peer, calling_ae, [StudyRootQueryRetrieveInformationModelFind])
    matches = []
    try:
        for status, found in assoc.send_c_find(identifier,
                                               StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and found is not None:
                matches.append({e.keyword: str(e.value) for e in found if e.keyword})
    finally:
        assoc.release()
    return matches


def store_path(peer: Peer, path: Path, *, calling_ae: str) -> None:
    """Send one file; raise PacsError unless the peer reports success."""
    status = store(peer, [path], calling_ae=calling_ae)[str(path)]
    if status != 0:
        raise PacsError(f"{peer.ae_title} answered C-STORE with status 0x{status & 0xFFFF:04X}")
