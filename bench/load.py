"""A closed-loop load generator on 127.0.0.1: `concurrency` clients, bounded count and time.

Reports requests/s, p50/p95/p99 latency and the server's peak RSS (sampled every 20 ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psutil


@dataclass
class LoadResult:
    concurrency: int
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    peak_rss: int
    cpu_s: float = 0.0  # CPU seconds the server used (user + system), all threads

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per answered request: what the work costs, whatever else ran on
        the machine (on a shared machine wall-clock figures depend on the neighbours)."""
        return self.cpu_s / self.ok if self.ok else float("nan")

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children."""
    try:
        proc = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0.0


def tree_rss(pid: int) -> int:
    """RSS of a process and its children, in bytes."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_load(
    url: str,
    body: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    server_pid: int,
    timeout_s: float = 600,
) -> LoadResult:
    """Send `requests` bodies with `concurrency` clients; stop starting new ones after
    `time_limit_s` (requests in flight finish and count)."""

    async def main() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors = 0
        next_id = 0
        started = time.perf_counter()
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

            async def client_loop() -> None:
                nonlocal next_id, errors
                while next_id < requests and time.perf_counter() - started < time_limit_s:
                    n = next_id
                    next_id += 1
                    sent = time.perf_counter()
                    try:
                        response = await client.post(f"{url}/rerank", json=body(n))
                        if response.status_code == 200:
                            latencies.append(time.perf_counter() - sent)
                        else:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - started

    cpu_before = tree_cpu(server_pid)
    with RssSampler(server_pid) as rss:
        latencies, errors, seconds = asyncio.run(main())
    cpu = tree_cpu(server_pid) - cpu_before
    return LoadResult(concurrency, len(latencies), errors, seconds, latencies, rss.peak, cpu)
