"""DICOM client operations: C-ECHO, C-STORE and C-FIND (pynetdicom)."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvision.errors import ConfigError, DeliveryError, PacsError
from medvision.pacs.config import Peer, PeerTLS

__all__ = ["STORAGE_COMMITMENT", "Delivery", "deliver", "echo", "find", "request_commitment",
           "store", "tls_context"]

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
#: Storage Commitment Push Model SOP Class, and its well-known SOP Instance.
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def tls_context(tls: PeerTLS) -> ssl.SSLContext:
    """A client TLS context for a peer: its CA, our certificate, hostname checking.

    Raises:
        ConfigError: a certificate or key file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        context.check_hostname = tls.check_hostname
        if tls.certificate is not None and tls.key is not None:
            context.load_cert_chain(str(tls.certificate), str(tls.key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"DICOM TLS: cannot load the CA, certificate or key ({e})") from e
    return context


def _associate(peer: Peer, calling_ae: str, contexts: Any) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    tls_args = None if peer.tls is None else (tls_context(peer.tls),
                                               peer.tls.server_name or peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        where = f"{peer.ae_title}@{peer.host}:{peer.port}"
        if peer.tls is not None and not assoc.is_rejected:
            raise DeliveryError(f"{where}: no TLS association (the handshake failed or the "
                                "peer is down: check that its certificate is signed by the "
                                "configured CA and names the host, and that it accepts our "
                                "client certificate)")
        if assoc.is_rejected:
            raise PacsError(f"{where}: the peer rejected the association (it may not know our "
                            f"AE title {calling_ae}, or the called AE title is wrong)")
        raise PacsError(f"{where}: no association (connection refused, timed out or aborted: "
                        "is the peer running on that host and port?)")
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


@dataclass(frozen=True)
class Delivery:
    """The peer's answer to one C-STORE that counts as delivered."""

    status: int
    category: str

    @property
    def note(self) -> str | None:
        """A warning worth keeping with the item, or ``None`` for plain success."""
        return None if self.status == 0 else f"{self.category} status 0x{self.status:04X}"


def deliver(peer: Peer, path: Path, *, calling_ae: str) -> Delivery:
    """Send one file and interpret the answer by its status category (PS3.7 C.4.2).

    Success and Warning (0xB000, 0xB006, 0xB007: stored, with a remark) are delivered.

    Raises:
        DeliveryError: a Failure status, no answer, or (``permanent``) a peer that accepts
            the object's SOP class in none of the offered transfer syntaxes.
        PacsError: no association could be made.
    """
    import pydicom
    from pynetdicom.status import code_to_category

    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError) as e:
        raise DeliveryError(f"{path}: cannot read the result for sending ({e})") from e
    sop_class = str(ds.SOPClassUID)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    offered = [syntax] + [s for s in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") if s != syntax]
    # Verification too, so a peer that refuses the object's SOP class still accepts the
    # association and its refusal can be told apart from a network failure.
    assoc = _associate(peer, calling_ae, [(sop_class, offered), VERIFICATION])
    name = getattr(ds.SOPClassUID, "name", sop_class)
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
        if not accepted:
            raise DeliveryError(
                f"{peer.ae_title} does not accept {name} ({sop_class}) in any of the transfer "
                "syntaxes offered; configure the peer to store this SOP class",
                permanent=True)
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DeliveryError(f"{peer.ae_title}: no answer to C-STORE (association aborted or "
                            "timed out)")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return Delivery(status=code, category=category)
    raise DeliveryError(f"{peer.ae_title} answered C-STORE with {category} status "
                        f"0x{code:04X}")


def request_commitment(peer: Peer, objects: list[tuple[str, str]], *,
                       calling_ae: str, transaction_uid: str | None = None) -> str:
    """Ask ``peer`` to commit to keeping ``objects`` (``(SOP Class UID, SOP Instance UID)``):
    an N-ACTION of the Storage Commitment Push Model under ``transaction_uid`` (a new one by
    default). The answer comes later, as an N-EVENT-REPORT on an association the peer opens
    to us (a fast peer sends it before the N-ACTION's answer: record the transaction first).
    Returns the Transaction UID.

    Raises:
        DeliveryError: the peer does not offer storage commitment (``permanent``) or
            refused the request.
        PacsError: no association.
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    request = Dataset()
    request.TransactionUID = transaction_uid or generate_uid()
    references = []
    for sop_class, sop_uid in objects:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        references.append(item)
    request.ReferencedSOPSequence = references
    assoc = _associate(peer, calling_ae, [STORAGE_COMMITMENT, VERIFICATION])
    try:
        if not any(cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
            raise DeliveryError(f"{peer.ae_title} does not offer Storage Commitment; turn "
                                "storage_commitment off for it", permanent=True)
        status, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or int(status.Status) != 0:
        code = int(status.Status) if status else -1
        raise DeliveryError(f"{peer.ae_title} refused the storage commitment request "
                            f"(status 0x{code & 0xFFFF:04X})")
    return str(request.TransactionUID)
