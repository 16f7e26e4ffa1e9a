"""Giving memory back after a big request.

Python frees a request's objects as soon as it is answered, but glibc's malloc keeps the freed
pages in its arenas (one per thread that allocated, and the inference threads do) instead of
returning them to the system, so the RSS of a server that answered one request of 16 MB stays
hundreds of MiB up. `malloc_trim(0)` returns them: `MemoryTrimmer.after_request` calls it in a
worker thread once a request of at least `min_bytes` has been answered, at most once per
`min_interval_s`. Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer:
    """Trims malloc's arenas after big requests (see the module docstring)."""

    def __init__(self, min_bytes: int = 1 << 20, min_interval_s: float = 1.0) -> None:
        self.min_bytes = min_bytes
        self.min_interval_s = min_interval_s
        self._trim = _malloc_trim()
        self._lock = threading.Lock()
        self._last = 0.0
        self._pending = False
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_request(self, body_bytes: int) -> None:
        """Called on the event loop once a request is answered; schedules a trim when it was big."""
        if self._trim is None or body_bytes < self.min_bytes:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        delay = max(0.0, self._last + self.min_interval_s - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        threading.Thread(target=self.trim_now, name="malloc-trim", daemon=True).start()

    def trim_now(self) -> None:
        """Return free heap memory to the system now (blocking; tens of ms on a large heap)."""
        try:
            if self._trim is not None:
                self._trim()
                self.trims += 1
        except Exception:  # never fail a request over housekeeping
            logger.debug("malloc_trim failed", exc_info=True)
        finally:
            with self._lock:
                self._pending = False
                self._last = time.monotonic()
