"""What goes out: the bridge's sender and the storage commitment it asks for.

A :class:`Sender` works through the outbox in its own thread: each due result goes to its
destination (C-STORE, STOW-RS or a FHIR transaction), is marked sent (or, with storage
commitment, waits for the destination's confirmation), and every delivery and every final
failure is audited. It also writes the bridge's heartbeat, so ``pacs status`` can tell a
running bridge from one that was killed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from medvision.audit.log import AuditLog
from medvision.audit.records import Auditor, AuditRecord, Pseudonymizer
from medvision.errors import AuditError, DeliveryError, PacsError
from medvision.io.header_checks import check_uid
from medvision.pacs.config import BridgeConfig, DicomWebEndpoint, FhirServer, Peer
from medvision.pacs.receive import why
from medvision.pacs.scu import deliver, request_commitment
from medvision.pacs.store import HEARTBEAT_S, BridgeStore, OutboxItem, OutboxState
from medvision.pacs.throttle import EndpointBook, ThrottledLog

__all__ = ["Sender"]

log = logging.getLogger(__name__)

#: N-EVENT-REPORT answer for a report the bridge does not accept (processing failure).
REFUSED = 0x0110


class Sender:
    """Sends queued results, asks for and receives storage commitment, audits deliveries."""

    def __init__(self, config: BridgeConfig, store: BridgeStore, *, audit_log: AuditLog,
                 pseudonymizer: Pseudonymizer, endpoints: EndpointBook,
                 errors: ThrottledLog) -> None:
        self.config = config
        self.store = store
        self.audit_log = audit_log
        self.pseudonymizer = pseudonymizer
        self.endpoints = endpoints
        self.errors = errors

    def run(self, stop: threading.Event, *, started: float) -> None:
        """Send until ``stop`` is set, beating the heartbeat every :data:`HEARTBEAT_S`."""
        beat = 0.0
        while not stop.is_set():
            if time.monotonic() - beat >= HEARTBEAT_S:
                try:  # on its own: a full disk must not stop the deliveries too
                    self.store.heartbeat(started=started)
                    beat = time.monotonic()
                except Exception as e:  # noqa: BLE001 - pacs status will call it not running
                    self.errors.log("writing the heartbeat", e)
            try:
                self.send_due()
            except Exception as e:  # noqa: BLE001 - the sender must keep running
                self.errors.log("sending results", e)
            stop.wait(self.config.poll_interval_s)

    def send_due(self) -> None:
        """One round: every due result once (a destination that does not answer is left
        for the next round), then storage commitment requests."""
        retry = self.config.retry
        unreachable: set[str] = set()
        for item in self.store.due_outbox(backoff_s=retry.backoff_s,
                                          max_backoff_s=retry.max_backoff_s):
            if item.destination in unreachable:
                continue
            endpoint = self.config.endpoint(item.destination)
            committing = isinstance(endpoint, Peer) and endpoint.storage_commitment
            try:
                note = self._deliver(item, endpoint)
            except DeliveryError as e:
                self._failed(item, str(e), permanent=e.permanent)
                continue
            except (PacsError, OSError) as e:
                self._failed(item, str(e), permanent=False)
                unreachable.add(item.destination)  # wait for the next round
                continue
            if note:
                log.warning("study %s: %s result delivered to %s, with a warning: %s",
                            self.store.study_folder_name(item.study_uid), item.kind,
                            item.destination, note)
            self.store.mark_sent(item.sop_uid, note=note, awaiting_commitment=committing)
            self.endpoints.success(item.destination, "destination")
            self._audit(item, "ok", note)
        destination = self.config.destination
        if isinstance(destination, Peer) and destination.storage_commitment:
            self.request_commitments(destination)

    def _deliver(self, item: OutboxItem,
                 endpoint: Peer | DicomWebEndpoint | FhirServer | None) -> str | None:
        """Send one result to its destination; returns a warning worth keeping.

        Raises:
            DeliveryError: refused (``permanent`` when resending cannot help).
            PacsError: no connection.
        """
        if endpoint is None:
            raise DeliveryError(f"destination {item.destination!r} is not in the settings any "
                                "more", permanent=True)
        if isinstance(endpoint, Peer):
            return deliver(endpoint, item.path, calling_ae=self.config.ae_title).note
        from medvision.pacs import web

        if isinstance(endpoint, FhirServer):
            return web.fhir_deliver(endpoint, item.path)
        return web.stow_deliver(endpoint, item.path)

    def _failed(self, item: OutboxItem, reason: str, *, permanent: bool) -> None:
        state = self.store.mark_failed_send(item.sop_uid, reason,
                                            max_attempts=self.config.retry.max_attempts,
                                            permanent=permanent)
        self.endpoints.failure(item.destination, reason)
        self.errors.log(f"study {self.store.study_folder_name(item.study_uid)}: sending a "
                        f"{item.kind} result (attempt {item.attempts + 1}, {state})", reason)
        if state == OutboxState.FAILED:
            self._audit(item, "failed", reason)

    def _audit(self, item: OutboxItem, status: str, reason: str | None) -> None:
        """Every delivery (first try or after `pacs retry`) and every final failure is
        audited, so the trail's last word on a result is what became of it."""
        auditor = Auditor(self.audit_log, self.pseudonymizer,
                          actor={"via": self.config.ae_title})
        try:
            auditor.record(AuditRecord(
                action="deliver", status=status, actor=auditor.actor, reason=reason,
                study_key=self.pseudonymizer.pseudonym("study", item.study_uid),
                result={"kind": item.kind, "attempts": item.attempts + 1,
                        "destination": item.destination, "sop_instance": item.sop_uid}))
        except AuditError as e:
            self.errors.log(f"recording a delivery ({status})", e)

    # --- storage commitment ----------------------------------------------------------------
    def request_commitments(self, peer: Peer) -> None:
        """Ask the destination to commit to what was sent; re-send what it never confirmed."""
        import pydicom

        retry = self.config.retry
        now = time.time()
        for item, asked in self.store.awaiting_commitment(requested=True):
            if now - asked > peer.commitment_timeout_s:
                self.store.commitment_failed(
                    item.sop_uid, f"no storage commitment report within "
                    f"{peer.commitment_timeout_s:.0f} s", max_attempts=retry.max_attempts)
        waiting = [item for item, _ in self.store.awaiting_commitment(requested=False)]
        if not waiting:
            return
        objects = []
        for item in waiting:
            sop_class = item.sop_class_uid
            if sop_class is None:  # queued by an older version, which did not record it
                sop_class = str(pydicom.dcmread(item.path, stop_before_pixels=True,
                                                specific_tags=["SOPClassUID"]).SOPClassUID)
            objects.append((sop_class, item.sop_uid))
        from pydicom.uid import generate_uid

        # recorded before the request: the peer may report before it answers the N-ACTION,
        # and a report naming a transaction the bridge does not know is refused
        transaction = str(generate_uid())
        self.store.mark_commitment_requested([item.sop_uid for item in waiting], transaction)
        try:
            request_commitment(peer, objects, calling_ae=self.config.ae_title,
                               transaction_uid=transaction)
        except DeliveryError as e:
            for item in waiting:
                self.store.commitment_failed(item.sop_uid, str(e),
                                             max_attempts=1 if e.permanent else
                                             retry.max_attempts)
            self.errors.log("requesting storage commitment", e)
        except PacsError as e:  # no association: ask again next round
            self.store.mark_commitment_requested([item.sop_uid for item in waiting], None)
            self.errors.log("requesting storage commitment", e)

    def on_commitment_report(self, event: Any) -> tuple[int, Any]:
        """N-EVENT-REPORT from the destination: which results it committed to keep.

        Only the destination's AE may report, and only on a transaction the bridge opened:
        a report from another AE, or naming an unknown Transaction UID, is refused (0x0110)
        and logged, and marks nothing."""
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        destination = self.config.destination
        if not (isinstance(destination, Peer) and destination.storage_commitment
                and calling == destination.ae_title):
            log.warning("storage commitment: refused a report from %s at %s: not the "
                        "destination's AE", calling, requestor.address)
            return REFUSED, None
        try:
            info = event.event_information
            transaction = check_uid(info.get("TransactionUID"), "TransactionUID")
            committed = [check_uid(i.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID")
                         for i in info.get("ReferencedSOPSequence", [])]
            failed = [(check_uid(i.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID"),
                       int(i.get("FailureReason", 0x0110)))
                      for i in info.get("FailedSOPSequence", [])]
        except Exception as e:  # noqa: BLE001 - a malformed report is refused, not fatal
            self.errors.log("reading a storage commitment report", why(e))
            return REFUSED, None
        if not self.store.commitment_transaction_known(transaction):
            log.warning("storage commitment: refused a report from %s at %s: unknown "
                        "Transaction UID", calling, requestor.address)
            return REFUSED, None
        for uid in committed:
            self.store.mark_committed(uid, transaction)
        for uid, reason in failed:
            self.store.commitment_failed(uid, f"the destination did not commit to keep it "
                                         f"(failure reason 0x{reason:04X})",
                                         max_attempts=self.config.retry.max_attempts,
                                         transaction=transaction)
        log.info("storage commitment report: %d committed, %d failed", len(committed),
                 len(failed))
        return 0x0000, None
