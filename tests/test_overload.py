"""Backpressure and timeouts through the real HTTP stack (a slow deterministic scorer)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.settings import Settings

from .conftest import running
from .fakes import KeywordRunner


class SlowRunner(KeywordRunner):
    def __init__(self, seconds: float) -> None:
        super().__init__("slow")
        self.seconds = seconds
        self.running = threading.Event()

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        self.running.set()
        time.sleep(self.seconds)
        return super().score(query, documents)


def slow_app(make_settings: Callable[..., Settings], seconds: float, **overrides: object):  # type: ignore[no-untyped-def]
    runner = SlowRunner(seconds)
    engine = Engine(runner, gate=GpuGate(None, 0, 0))
    return create_app(make_settings(**overrides), engine_factory=lambda _s: engine), runner


BODY = {"query": "q", "documents": ["a", "b"], "top_k": 1}


def test_full_queue_answers_429_with_retry_after(make_settings: Callable[..., Settings]) -> None:
    app, _ = slow_app(make_settings, 0.5, workers=1, max_queue=1)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return list(
                await asyncio.gather(*(client.post("/rerank", json=BODY) for _ in range(6)))
            )

    with running(app) as url:
        started = time.perf_counter()
        responses = asyncio.run(burst(url))
        elapsed = time.perf_counter() - started
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        refused = [r for r in responses if r.status_code == 429]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert all(r.json()["error_type"] == "overloaded" for r in refused)
        assert elapsed < 3  # refused at once, not after waiting
        # capacity comes back once the queue drains
        assert httpx.post(f"{url}/rerank", json=BODY).status_code == 200


def test_request_timeout_is_a_retryable_503(make_settings: Callable[..., Settings]) -> None:
    app, runner = slow_app(make_settings, 1.0, request_timeout_s=0.2)
    with running(app) as url:
        response = httpx.post(f"{url}/rerank", json=BODY)
        assert response.status_code == 503
        assert response.json()["error_type"] == "timeout"
        assert response.headers["Retry-After"]
        assert runner.running.is_set()
        assert httpx.get(f"{url}/health").status_code == 200


def test_four_times_capacity_gets_only_200_or_429_and_bounded_latency(
    make_settings: Callable[..., Settings],
) -> None:
    service_s = 0.2
    app, _ = slow_app(make_settings, service_s, workers=1, max_queue=3)  # capacity 4

    async def timed(client: httpx.AsyncClient) -> tuple[int, float, str | None]:
        started = time.perf_counter()
        response = await client.post("/rerank", json=BODY)
        return (
            response.status_code,
            time.perf_counter() - started,
            response.headers.get("Retry-After"),
        )

    async def waves(url: str) -> list[tuple[int, float, str | None]]:
        results: list[tuple[int, float, str | None]] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(3):  # three bursts of 16 = 4x capacity each
                results += await asyncio.gather(*(timed(client) for _ in range(16)))
        return results

    with running(app) as url:
        results = asyncio.run(waves(url))
    codes = {code for code, _, _ in results}
    assert codes <= {200, 429}, codes
    admitted = [seconds for code, seconds, _ in results if code == 200]
    refused = [retry for code, _, retry in results if code == 429]
    assert len(admitted) >= 3 * 4 and refused and all(r and int(r) >= 1 for r in refused)
    # an admitted request waits for at most the queue ahead of it: (capacity) x service time
    assert max(admitted) < 4 * service_s + 1.0, max(admitted)


def test_a_full_queue_is_still_ready(make_settings: Callable[..., Settings]) -> None:
    app, runner = slow_app(make_settings, 1.0, workers=1, max_queue=0)
    with running(app) as url:
        busy = threading.Thread(target=lambda: httpx.post(f"{url}/rerank", json=BODY, timeout=30))
        busy.start()
        assert runner.running.wait(5)
        assert httpx.post(f"{url}/rerank", json=BODY).status_code == 429  # the queue is full
        assert httpx.get(f"{url}/health/ready").json() == {"status": "ready"}
        busy.join()
