"""An HTTP capture server on loopback: records every request (method, raw path, headers, body)
and answers a STOW-RS POST as a DICOMweb server would (every part listed as stored), so the
bridge's outgoing requests can be checked where they land. ``redirect_to`` answers every
request with a 307 to that path instead (a server trying to send the bridge elsewhere)."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False)


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body."""
    from medvision.pacs.stow import split_multipart

    return [data for kind, data in split_multipart(content_type, body)
            if kind == "application/dicom"]


class CaptureServer:
    def __init__(self, *, redirect_to: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None, list_stored: bool = True) -> None:
        """``tls``: (certificate, key, CA) to serve HTTPS that requires a client certificate
        signed by the CA."""
        self.requests: list[Captured] = []
        self.redirect_to = redirect_to
        self.list_stored = list_stored
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                body = self._body()
                owner.requests.append(Captured(self.command, self.path, dict(self.headers), body))
                if owner.redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", owner.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = owner._stow_answer(self.headers.get("Content-Type", "")
                                            if owner.list_stored else "", body)
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_POST = do_GET = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls[2]))
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            context.verify_mode = ssl.CERT_REQUIRED
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _stow_answer(content_type: str, body: bytes) -> dict:
        import pydicom
        from pydicom.dataset import Dataset

        response = Dataset()
        referenced = []
        if content_type.startswith("multipart/"):
            for data in dicom_parts(content_type, body):
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                item = Dataset()
                item.ReferencedSOPClassUID = ds.SOPClassUID
                item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                referenced.append(item)
        response.ReferencedSOPSequence = referenced
        return dict(response.to_json_dict())

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicom-web/"

    def objects(self, folder: Path) -> list[Path]:
        """Every DICOM object POSTed so far, written to ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for n, request in enumerate(list(self.requests)):
            kind = request.headers.get("Content-Type", "")
            if request.method != "POST" or not kind.startswith("multipart/"):
                continue
            for m, data in enumerate(dicom_parts(kind, request.body)):
                path = folder / f"{n:03d}-{m}.dcm"
                path.write_bytes(data)
                out.append(path)
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
