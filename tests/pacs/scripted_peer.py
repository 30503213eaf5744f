"""A real DICOM peer (pynetdicom Store SCP) that answers C-STORE with chosen statuses.

It is the destination a hospital network gives the bridge on a bad day: a PACS that stores
with a warning, refuses for a while, does not accept some SOP class, or is down.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

__all__ = ["ScriptedPeer", "free_port"]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ScriptedPeer:
    """Store SCP on 127.0.0.1 answering every C-STORE with ``status`` (changeable).

    Attributes:
        received: SOP Instance UID -> how many C-STOREs of it arrived (whatever the answer).
        stored: the data sets answered with success or warning, by SOP Instance UID.
    """

    def __init__(self, *, ae_title: str = "PACS", status: int = 0x0000,
                 refuse_sop_classes: tuple[str, ...] = (), port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.status = status
        self.refuse = refuse_sop_classes
        self.received: dict[str, int] = {}
        self.stored: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            self.received[uid] = self.received.get(uid, 0) + 1
            status = self.status
            if status in (0x0000, 0xB000, 0xB006, 0xB007):
                self.stored[uid] = ds
        return status

    def start(self) -> ScriptedPeer:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            if str(context.abstract_syntax) not in self.refuse:
                ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification, as every PACS has
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def of_class(self, sop_class: str) -> list[Any]:
        """Stored data sets of one SOP class."""
        with self._lock:
            return [ds for ds in self.stored.values() if str(ds.SOPClassUID) == sop_class]
