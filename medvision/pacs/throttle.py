"""Error logging that does not flood: one line per kind of error per interval, with a count.

A bridge whose disk is full fails the same way every half second; logging each failure would
fill what little space is left and bury the first, useful line. :class:`ThrottledLog` logs the
first occurrence of each (what, error type) at once, then at most once per ``interval_s``
with how many were suppressed meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medvision.pacs.store import BridgeStore

__all__ = ["EndpointBook", "ThrottledLog"]


class ThrottledLog:
    """Rate-limited ``logger.error`` for repeating failures."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def log(self, what: str, error: BaseException | str) -> bool:
        """Log ``error`` while doing ``what`` unless the same kind was logged recently;
        returns whether a line was written."""
        kind = type(error).__name__ if isinstance(error, BaseException) else "error"
        key = (what.split(" (")[0], kind)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            repeated = self._suppressed.pop(key, 0)
            self._last[key] = now
        suffix = f" (and {repeated} more like it in the last {self.interval_s:.0f} s)" \
            if repeated else ""
        self.logger.error("%s failed: %s%s", what, error, suffix)
        return True


class EndpointBook:
    """Records each source's and destination's last success and error for ``pacs status``:
    a success at most every few seconds per endpoint (each record is a synchronous database
    write, and a busy listener succeeds many times a second)."""

    def __init__(self, store: BridgeStore, errors: ThrottledLog, *,
                 interval_s: float = 5.0) -> None:
        self.store = store
        self.errors = errors
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def success(self, name: str, role: str) -> None:
        """``name`` (a ``source`` or ``destination``) just worked."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get((role, name), -1e9) < self.interval_s:
                return
            self._last[(role, name)] = now
        try:
            self.store.endpoint_result(name, role=role)
        except Exception as e:  # noqa: BLE001 - bookkeeping must not refuse an instance
            self.errors.log("recording a success", e)

    def failure(self, name: str, error: str) -> None:
        """Destination ``name`` just failed with ``error``."""
        try:
            self.store.endpoint_result(name, error, role="destination")
        except Exception as e:  # noqa: BLE001 - bookkeeping only
            self.errors.log("recording a delivery error", e)
