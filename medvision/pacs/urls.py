"""URLs built from received data stay under the configured base URL.

Two guards, one for each way a URL is made: :func:`url_under` builds one from a base and
path segments (each validated by the caller and percent-encoded here), and
:func:`check_under` is run on every request a bridge session is about to send (including
redirects), before its credentials leave the process. A request that would leave the base
(another scheme, host or port, a path outside the base's, a dot segment, or an encoded slash
or dot segment) is refused with :class:`UnsafeUrlError`.
"""

from __future__ import annotations

import posixpath
from urllib.parse import quote, unquote, urlsplit

from medvision.errors import DeliveryError

__all__ = ["UnsafeUrlError", "check_under", "url_under"]


class UnsafeUrlError(DeliveryError):
    """A URL made from data would leave the configured base; nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _default_port(scheme)
    except ValueError as e:
        raise UnsafeUrlError(f"malformed port in a request URL ({e})") from e
    return scheme, (parts.hostname or "").lower(), port


def _base_path(base: str) -> str:
    path = urlsplit(base).path or "/"
    return path if path.endswith("/") else path + "/"


def check_under(base: str, url: str) -> None:
    """Refuse ``url`` unless it is ``base`` or a path below it, on the same origin.

    Raises:
        UnsafeUrlError: it is not (the message names the base, never the data in the URL).
    """
    if _origin(url) != _origin(base):
        raise UnsafeUrlError(f"refused a request to another server than {base}")
    parts = urlsplit(url)
    raw = parts.path or "/"
    segments = raw.split("/")
    for segment in segments:
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded:
            raise UnsafeUrlError(f"refused a request with a dot segment or an encoded "
                                 f"separator in its path (base {base})")
    normalised = posixpath.normpath(raw) + ("/" if raw.endswith("/") else "")
    prefix = _base_path(base)
    if not (normalised + "/").startswith(prefix) and normalised != prefix.rstrip("/"):
        raise UnsafeUrlError(f"refused a request outside {base}")


def url_under(base: str, *segments: str) -> str:
    """``base`` followed by ``segments``, each percent-encoded as one path segment.

    Raises:
        UnsafeUrlError: a segment is empty or a dot segment, or the result leaves ``base``.
    """
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnsafeUrlError(f"refused an empty or dot path segment under {base}")
    url = base.rstrip("/") + "".join("/" + quote(segment, safe="") for segment in segments)
    check_under(base, url)
    return url
