"""The bridge's STOW-RS endpoint: ``POST /studies`` and ``POST /studies/{study}``.

A small Starlette app on uvicorn, in a thread of the bridge. Each request must carry
``Authorization: Bearer <token>`` of a configured sender (compared in constant time against the
token's SHA-256); others get 401 and nothing is read. The body is
``multipart/related; type="application/dicom"``: every part is checked like a C-STORE
(decodable, UIDs present, uncompressed pixel data complete, in the study of the URL if given)
and written durably (fsync, rename, database commit) before the response is sent. The response
is the STOW-RS dataset (PS3.18 10.5.3) in DICOM JSON: the stored instances in the Referenced
SOP Sequence, the refused ones in the Failed SOP Sequence with a reason; 200 when all were
stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medvision.errors import PacsError
from medvision.io.header_checks import uid_problem

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from medvision.pacs.config import StowListener

__all__ = ["StoreOutcome", "StowServer", "split_multipart"]

log = logging.getLogger(__name__)

#: PS3.18 / PS3.4 failure reasons used in the Failed SOP Sequence.
PROCESSING_FAILURE, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0110, 0xA700, 0xC000


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one part: stored, or refused with a failure reason."""

    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None
    why: str = ""


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/related`` body as ``(content type, bytes)``.

    Raises:
        ValueError: not multipart, or no boundary.
    """
    import email
    from email import policy

    if "boundary=" not in content_type or not content_type.lower().startswith("multipart/"):
        raise ValueError("expected multipart/related with a boundary")
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body,
        policy=policy.HTTP)
    if not message.is_multipart():
        raise ValueError("the body is not a multipart message")
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        parts.append((part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    return parts


class StowServer:
    """The STOW-RS listener; ``accept(data, sender, study)`` stores one instance."""

    def __init__(self, listener: StowListener,
                 accept: Callable[[bytes, str, str | None], StoreOutcome]) -> None:
        self.listener = listener
        self.accept = accept
        self._tokens: list[tuple[str, bytes]] = []
        for sender in listener.senders:
            if sender.token_sha256 is not None:
                digest = bytes.fromhex(sender.token_sha256)
            else:
                from medvision.pacs.config import HttpAuth

                token = HttpAuth().secret(sender.token_env) or ""
                digest = hashlib.sha256(token.encode()).digest()
            self._tokens.append((sender.name, digest))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def sender(self, authorization: str | None) -> str | None:
        """The configured sender whose token this ``Authorization`` header carries."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for name, expected in self._tokens:  # compare with every token: constant time
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def app(self) -> Starlette:
        """The ASGI application."""
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[Route("/studies", self._store, methods=["POST"]),
                                 Route("/studies/{study}", self._store, methods=["POST"])])

    async def _store(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, Response

        sender = self.sender(request.headers.get("authorization"))
        if sender is None:
            log.warning("STOW-RS: refused a request from %s without a valid token",
                        request.client.host if request.client else "?")
            return Response(status_code=401, headers={"WWW-Authenticate": 'Bearer realm="medvision"'})
        study = request.path_params.get("study")
        problem = None if study is None else uid_problem(study)
        if problem is not None:
            log.warning("STOW-RS: refused a request from %s: the study in the URL is not a "
                        "valid UID (%s)", sender, problem)
            return Response("the Study Instance UID in the URL is not a valid DICOM UID",
                            status_code=400)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/related"):
            return Response("expected multipart/related; type=\"application/dicom\"",
                            status_code=415)
        limit = int(self.listener.max_request_mb * 2**20)
        if int(request.headers.get("content-length") or 0) > limit:
            return Response(f"request larger than {self.listener.max_request_mb} MB",
                            status_code=413)
        # Counted while streaming: a chunked body (no Content-Length) or one longer than its
        # Content-Length stops at the limit instead of being read whole first.
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                log.warning("STOW-RS: refused a request from %s larger than %s MB", sender,
                            self.listener.max_request_mb)
                return Response(f"request larger than {self.listener.max_request_mb} MB",
                                status_code=413, headers={"Connection": "close"})
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            parts = await run_in_threadpool(split_multipart, content_type, body)
        except ValueError as e:
            return Response(str(e), status_code=400)
        outcomes = []
        for part_type, data in parts:
            if part_type != "application/dicom":
                outcomes.append(StoreOutcome("", "", CANNOT_UNDERSTAND,
                                             f"part of type {part_type}"))
                continue
            outcomes.append(await run_in_threadpool(self.accept, data, sender, study))
        stored = [o for o in outcomes if o.failure is None]
        failed = [o for o in outcomes if o.failure is not None]
        log.info("STOW-RS from %s: %d stored, %d refused", sender, len(stored), len(failed))
        status = 200 if not failed else 202 if stored else 409
        return JSONResponse(_response_dataset(outcomes, str(request.url)), status_code=status,
                            media_type="application/dicom+json")

    def start(self) -> None:
        """Serve in a thread; returns once the socket listens.

        Raises:
            PacsError: the server could not start (port in use...).
        """
        import uvicorn

        tls = self.listener.tls
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls.certificate), "ssl_keyfile": str(tls.key)}
            if tls.ca is not None:
                options.update(ssl_ca_certs=str(tls.ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app(), host=self.listener.host, port=self.listener.port,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=10, **options)
        config.load()
        if config.ssl is not None:
            # asyncio drops a failed handshake silently: its TLS objects log it here
            config.ssl.sslobject_class = _LoggedHandshake
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name="medvision-bridge-stow")
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise PacsError(f"the STOW-RS listener could not start on "
                                f"{self.listener.host}:{self.listener.port} (port in use?)")
            self._thread.join(0.05)
        log.info("STOW-RS listening on %s:%d", self.listener.host, self.listener.port)

    def stop(self) -> None:
        """Stop serving (requests in progress finish)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


class _LoggedHandshake(ssl.SSLObject):
    """The listener's TLS connections: a failed handshake (no client certificate, one from
    another CA, plain HTTP on the TLS port) is logged, then refused as before."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            log.warning("STOW-RS: TLS handshake failed: %s", e.reason or type(e).__name__)
            raise


def _response_dataset(outcomes: list[StoreOutcome], url: str) -> dict[str, Any]:
    from pydicom.dataset import Dataset

    response = Dataset()
    response.RetrieveURL = url
    referenced, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        if outcome.sop_class_uid:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
        if outcome.sop_instance_uid:
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.failure is None:
            referenced.append(item)
        else:
            item.FailureReason = outcome.failure
            failed.append(item)
    response.ReferencedSOPSequence = referenced
    response.FailedSOPSequence = failed
    return dict(response.to_json_dict())


def parse_instance(data: bytes) -> Any:
    """Decode one received Part 10 instance (header and pixel data) with pydicom.

    Raises:
        Exception: whatever pydicom raises on a malformed file.
    """
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))
