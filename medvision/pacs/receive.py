"""What comes in: the checks every received instance passes, and the DIMSE listener.

Every way in (C-STORE, STOW-RS, WADO-RS retrieval) runs :func:`validate_instance` before an
instance is filed: its UIDs, the patient, study and equipment values results copy, and its
pixel data length (see :mod:`medvision.io.header_checks`). A refusal's reason names the
attribute, never its value.

The DIMSE listener is pynetdicom's association server with three additions: connections from
addresses outside the configured networks are closed before a byte is read, every rejected
association is logged (calling AE, called AE, peer address, reason), and every failed TLS
handshake is logged with the peer's address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

from medvision.errors import ConfigError, InvalidDicomError, MedvisionError
from medvision.io.header_checks import check_copied_values, check_dataset_uids

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "CANNOT_UNDERSTAND", "OUT_OF_RESOURCES",
           "DimseListener", "parse_networks", "printable", "validate_instance", "why"]

log = logging.getLogger(__name__)

#: C-STORE failure status: "Cannot understand" (the dataset could not be parsed or is invalid).
CANNOT_UNDERSTAND = 0xC210
#: C-STORE failure status: "Out of resources" (the instance could not be stored).
OUT_OF_RESOURCES = 0xA700

#: Transfer syntaxes the listener accepts: every one the readers decode (pydicom with
#: pylibjpeg's libjpeg, OpenJPEG and RLE plugins), uncompressed first.
ACCEPTED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE Lossless
)


def validate_instance(ds: Any) -> None:
    """Refuse a dataset unless it can be filed: every UID valid (Study, Series, SOP Instance,
    SOP Class, Frame of Reference, Transfer Syntax, references), the patient, study and
    equipment values results copy valid for their VRs, and its uncompressed pixel data
    complete.

    Raises:
        InvalidDicomError: why not, naming the attribute (never its value).
    """
    from pydicom.pixels.utils import get_expected_length

    check_dataset_uids(ds)
    check_copied_values(ds)
    if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = get_expected_length(ds)
        if len(ds.PixelData) < expected:
            raise InvalidDicomError(f"pixel data truncated ({len(ds.PixelData)} of {expected} "
                                    "bytes)")


def why(error: BaseException) -> str:
    """A refusal's reason for logs, answers and the job table: medvision's own messages
    (which never quote header values) in full, a foreign exception by its type only (its
    text may quote them: a patient's name in a highdicom or pydicom message)."""
    name = type(error).__name__
    return f"{name}: {error}" if isinstance(error, MedvisionError) else name


def printable(text: str) -> str:
    """A peer-given name (an AE title) for a log line: as it is when printable, else its
    escaped form, so a control character cannot forge or break a line."""
    return text if text.isprintable() else ascii(text)


def parse_networks(networks: Sequence[str]) -> tuple[ipaddress.IPv4Network |
                                                     ipaddress.IPv6Network, ...]:
    """CIDR strings as networks.

    Raises:
        ConfigError: one is not a network.
    """
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    except ValueError as e:
        raise ConfigError(f"allowed_peer_networks: {e}") from e


def _rejection_reason(assoc: Any, allowed_calling: Sequence[str], called: str) -> str:
    primitive = assoc.requestor.primitive
    calling_ae = str(getattr(primitive, "calling_ae_title", "")).strip()
    called_ae = str(getattr(primitive, "called_ae_title", "")).strip()
    if allowed_calling and calling_ae not in allowed_calling:
        return "calling AE title not allowed"
    if called_ae != called:
        return f"called AE title is not {called}"
    return "too many associations at once"


class DimseListener:
    """The Store SCP: a pynetdicom server with a peer allow-list and logged refusals."""

    def __init__(self, *, ae_title: str, host: str, port: int,
                 allowed_calling_aes: Sequence[str], peer_networks: Sequence[str],
                 ssl_context: ssl.SSLContext | None,
                 handlers: list[tuple[Any, Callable[..., Any]]],
                 contexts: Sequence[str], extra_contexts: Sequence[tuple[Any, bool]] = ()
                 ) -> None:
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allowed_calling_aes = tuple(allowed_calling_aes)
        self.networks = parse_networks(peer_networks)
        self.ssl_context = ssl_context
        self.handlers = handlers
        self.contexts = contexts
        self.extra_contexts = extra_contexts
        self._server: Any = None

    def _server_class(self) -> type:
        from pynetdicom.transport import ThreadedAssociationServer

        networks = self.networks

        class GuardedServer(ThreadedAssociationServer):  # type: ignore[misc]
            def verify_request(self, request: Any, client_address: Any) -> bool:
                address = ipaddress.ip_address(client_address[0])
                if networks and not any(address in network for network in networks):
                    log.warning("DIMSE: refused a connection from %s: not in "
                                "allowed_peer_networks", client_address[0])
                    return False
                return True

            def get_request(self) -> tuple[socket.socket, Any]:
                # the TLS handshake happens here; socketserver drops its failure silently
                assert self.socket is not None
                client, address = self.socket.accept()
                if self.ssl_context:
                    try:
                        client = self.ssl_context.wrap_socket(client, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        log.warning("DIMSE: TLS handshake with %s failed: %s", address[0],
                                    getattr(e, "reason", None) or type(e).__name__)
                        client.close()
                        raise
                return client, address

        return GuardedServer

    def start(self) -> None:
        """Listen in a thread.

        Raises:
            ConfigError: the address cannot be listened on (port in use, no such address).
        """
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for context in self.contexts:
            ae.add_supported_context(context, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        for abstract, roles in self.extra_contexts:
            ae.add_supported_context(abstract, scu_role=roles, scp_role=roles)
        if self.allowed_calling_aes:
            ae.require_calling_aet = list(self.allowed_calling_aes)
        else:
            log.warning("DIMSE: allowed_calling_aes is empty: any calling AE title is accepted")
        ae.require_called_aet = True
        ae.maximum_associations = 32
        allowed, called = self.allowed_calling_aes, self.ae_title

        def rejected(event: Any) -> None:
            primitive = event.assoc.requestor.primitive
            log.warning("DIMSE: rejected an association from %s (calling AE %r, called AE "
                        "%r): %s", event.assoc.requestor.address,
                        str(getattr(primitive, "calling_ae_title", "")).strip(),
                        str(getattr(primitive, "called_ae_title", "")).strip(),
                        _rejection_reason(event.assoc, allowed, called))

        try:
            server = ae.make_server((self.host, self.port), ssl_context=self.ssl_context,
                                    evt_handlers=[*self.handlers, (evt.EVT_REJECTED, rejected)],
                                    server_class=self._server_class())
        except OSError as e:
            raise ConfigError(f"cannot listen for DIMSE on {self.host}:{self.port}: "
                              f"{e.strerror or e} (another process on that port? see 'port' "
                              "and 'host' in the bridge settings)") from e
        ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does: shutdown() needs it
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True,
                         name="medvision-bridge-dimse").start()
        log.info("listening as %s on %s:%d%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self.ssl_context else "")

    def stop(self) -> None:
        """Stop accepting; associations in progress finish."""
        if self._server is not None:
            self._server.shutdown()
