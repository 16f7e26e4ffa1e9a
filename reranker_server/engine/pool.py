"""Admits requests and runs their blocking work off the event loop, with a bound and a timeout.

At most `workers + max_queue` requests are admitted at once; past that a request is refused at
once with `OverloadedError` (HTTP 429 + Retry-After) instead of piling up memory. Each admitted
request gets a thread of its own (cheap: it tokenizes, looks up the cache and then waits), with an
deadline (`deadline_for`), which its `RerankJob` carries: the engine's `Scheduler` runs the model
calls of all admitted requests in line order on its `workers` compute threads, so this pool never
oversubscribes the cores. A request that waits plus runs past its deadline gets
`RequestTimeoutError` (HTTP 503 + Retry-After) and its queued pairs are dropped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..errors import OverloadedError, RequestTimeoutError

T = TypeVar("T")


class InferencePool:
    """A fixed set of inference threads behind an admission counter."""

    def __init__(self, workers: int, max_queue: int, timeout_s: float) -> None:
        self._capacity = workers + max_queue
        self._executor = ThreadPoolExecutor(
            max_workers=self._capacity, thread_name_prefix="request"
        )
        self._timeout_s = timeout_s
        self._workers = workers
        self._lock = threading.Lock()
        self._pending = 0
        self._running = 0

    @property
    def pending(self) -> int:
        """Requests admitted and not finished (running + queued)."""
        return self._pending

    @property
    def running(self) -> int:
        """Jobs running in a worker thread now."""
        return self._running

    @property
    def queued(self) -> int:
        """Jobs admitted and waiting for a worker."""
        return max(0, self._pending - self._running)

    def deadline_for(self) -> float:
        """The `time.monotonic()` by which a request admitted now must be answered."""
        return time.monotonic() + self._timeout_s

    async def run(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run `fn` in a worker thread; refuse when full, give up at `deadline` (default: the
        timeout from now)."""
        with self._lock:
            if self._pending >= self._capacity:
                raise OverloadedError(
                    f"server busy: {self._pending} requests in progress or queued "
                    f"(limit {self._capacity}); retry later",
                    retry_after_s=self._retry_after(),
                )
            self._pending += 1
        if deadline is None:
            deadline = self.deadline_for()

        def job() -> T:
            with self._lock:
                self._running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self._running -= 1

        future = self._executor.submit(job)
        future.add_done_callback(self._release)
        try:
            wait_s = max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.wrap_future(future), wait_s)
        except TimeoutError as exc:
            future.cancel()  # drops it if it has not started; a running one finishes alone
            raise RequestTimeoutError(
                f"request did not finish within {self._timeout_s:g} s; retry later",
                retry_after_s=self._retry_after(),
            ) from exc

    def _release(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def _retry_after(self) -> int:
        return max(1, self._pending // max(1, self._workers))

    def shutdown(self) -> None:
        """Finish running work, then stop the threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
