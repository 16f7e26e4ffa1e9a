"""Faults in a scorer (raises, returns NaN, hangs) fail only the requests that touched them,
with a clear error; NaN never reaches a client; the server keeps serving. Real HTTP, real
scheduler; the fault sits in a deterministic scorer behind the runner contract."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.engine.scheduler import Scheduler
from reranker_server.settings import Settings

from .conftest import running
from .fakes import KeywordRunner


class FaultyRunner(KeywordRunner):
    """RAISE -> exception, NAN -> NaN, HANG -> blocks until released (bounded at 60 s)."""

    def __init__(self) -> None:
        super().__init__("faulty")
        self.release = threading.Event()
        self.hanging = threading.Event()

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        if any("RAISE" in d for d in documents):
            raise RuntimeError("scorer exploded")
        if any("HANG" in d for d in documents):
            self.hanging.set()
            self.release.wait(60)
        scores = super().score(query, documents)
        return [float("nan") if "NAN" in d else s for d, s in zip(documents, scores, strict=True)]


@pytest.fixture
def faulty(make_settings: Callable[..., Settings]) -> Iterator[tuple[str, FaultyRunner]]:
    runner = FaultyRunner()
    scheduler = Scheduler(2, name="test-run")
    engine = Engine(runner, gate=GpuGate(None, 0, 0), scheduler=scheduler)
    settings = make_settings(request_timeout_s=3.0, workers=2, max_queue=16)
    with running(create_app(settings, engine_factory=lambda _s: engine)) as url:
        yield url, runner
        runner.release.set()
    scheduler.close()


def ask(url: str, *docs: str) -> httpx.Response:
    return httpx.post(
        f"{url}/rerank", json={"query": "paris", "documents": list(docs), "top_k": 2}, timeout=30
    )


def test_a_raising_scorer_fails_its_request_only(faulty: tuple[str, FaultyRunner]) -> None:
    url, _ = faulty
    bad = ask(url, "RAISE", "paris")
    assert bad.status_code == 500 and bad.json()["error_type"] == "inference_error"
    assert "exploded" not in bad.text and "Traceback" not in bad.text
    assert ask(url, "paris", "berlin").status_code == 200


def test_nan_never_reaches_a_client(faulty: tuple[str, FaultyRunner]) -> None:
    url, _ = faulty
    bad = ask(url, "NAN", "paris")
    assert bad.status_code == 500 and "invalid scores" in bad.json()["error"]
    assert "NaN" not in bad.text and "nan" not in bad.text.replace("inference", "")
    assert ask(url, "paris", "berlin").json()["results"][0]["score"] >= 0


def test_a_hanging_scorer_times_out_its_request_and_others_are_served(
    faulty: tuple[str, FaultyRunner],
) -> None:
    url, runner = faulty

    async def scenario() -> tuple[httpx.Response, list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            hung = asyncio.create_task(
                client.post("/rerank", json={"query": "paris", "documents": ["HANG"], "top_k": 1})
            )
            while not runner.hanging.is_set():
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            others = await asyncio.gather(
                *(
                    client.post(
                        "/rerank",
                        json={"query": "paris", "documents": [f"paris {i}", "berlin"], "top_k": 1},
                    )
                    for i in range(5)
                )
            )
            return await hung, list(others), time.perf_counter() - started

    hung, others, elapsed = asyncio.run(scenario())
    assert hung.status_code == 503 and hung.json()["error_type"] == "timeout"
    assert "Retry-After" in hung.headers
    # Served by the other run while the hung one is stuck: had they queued behind it, they
    # would have timed out too (503). No wall-clock bound: a busy machine must not fail this.
    assert [r.status_code for r in others] == [200] * 5
    assert elapsed < 60
    runner.release.set()
    assert ask(url, "paris", "berlin").status_code == 200
