"""`GET /metrics` after real requests: the counts move as they should."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.cache import MemoryScoreCache
from reranker_server.engine.engine import Engine
from reranker_server.settings import Settings

from .conftest import running
from .fakes import FakeAccelerator, KeywordRunner

BODY = {
    "query": "capital of france",
    "documents": ["paris is the capital of france", "berlin is in germany", "bananas", "rome"],
    "top_k": 2,
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_real_requests(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(stage2_on_cpu=True))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = scrape(client)
        assert value(before, "reranker_model_load_seconds") > 0
        assert value(before, "reranker_cache_up", backend="memory") == 1.0

        assert client.post("/rerank", json=BODY).status_code == 200
        assert client.post("/rerank", json=BODY).status_code == 200  # all pairs cached
        assert client.post("/rerank", json={**BODY, "query": " "}).status_code == 422
        bad_type = client.post("/rerank", content=b"x", headers={"content-type": "text/plain"})
        assert bad_type.status_code == 415
        assert client.get("/nope").status_code == 404
        samples = scrape(client)

    def requests(status: str, route: str = "/rerank", dialect: str = "native") -> float:
        return value(
            samples, "reranker_requests_total", route=route, dialect=dialect, status=status
        )

    assert requests("200") == 2
    assert requests("422") == 1
    assert requests("415") == 1  # answered by the guard, still counted under its route
    assert requests("404", "unmatched", "none") == 1
    assert requests("200", "/metrics", "metrics") == 1  # the first scrape
    duration = "reranker_request_duration_seconds_count"
    assert value(samples, duration, route="/rerank", dialect="native") == 4

    stage = "reranker_stage_duration_seconds_count"
    assert value(samples, stage, stage="stage1", device="cpu") == 2
    assert value(samples, stage, stage="stage2", device="cpu") == 2
    assert value(samples, stage, stage="queue_wait", device="none") == 2
    assert value(samples, "reranker_cache_misses_total", stage="stage1") == 4
    assert value(samples, "reranker_cache_hits_total", stage="stage1") == 4
    assert value(samples, "reranker_cache_hits_total", stage="stage2") == 4
    assert value(samples, "reranker_cache_entries", backend="memory") == 8
    assert value(samples, "reranker_request_documents_count") == 2
    assert value(samples, "reranker_request_documents_sum") == 8
    assert value(samples, "reranker_request_tokens_sum") > 4  # first request only
    assert value(samples, "reranker_batch_size_pairs_sum", stage="stage1", device="cpu") == 4
    assert value(samples, "reranker_backend_requests_total", backend="cpu") == 2
    assert value(samples, "reranker_in_flight_requests") == 0
    assert value(samples, "reranker_queue_depth_requests") == 0
    assert not any(name.startswith("reranker_gpu_memory") for name, _ in samples)


class FakeGpuRunner(KeywordRunner):
    """A keyword scorer "on the GPU": every forward goes through the fake device first."""

    def __init__(self, accelerator: FakeAccelerator) -> None:
        super().__init__("gpu-kw", device="cuda:0")
        self.accelerator = accelerator

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        self.accelerator.before_forward(len(documents))
        return super().score(query, documents)


def test_gpu_fallbacks_and_memory(make_settings: Callable[..., Settings]) -> None:
    gpu = FakeAccelerator(free_mb=3000, total_mb=4096)

    def factory(_settings: Settings) -> Engine:
        return Engine(
            KeywordRunner(),
            gate=GpuGate(gpu, min_free_vram_mb=512, cooldown_s=30),
            stage2_gpu=FakeGpuRunner(gpu),
            cache=MemoryScoreCache(1 << 20),
        )

    with running(create_app(make_settings(), factory)) as url, httpx.Client(base_url=url) as client:
        ok = client.post("/rerank", json=BODY).json()
        assert ok["backend"] == "gpu"
        gpu.oom_at_pairs = 1
        oom = client.post("/rerank", json={**BODY, "query": "new query"}).json()
        assert oom["fallback"] == "oom"
        cooling = client.post("/rerank", json={**BODY, "query": "third"}).json()
        assert cooling["fallback"] == "cooldown"
        samples = scrape(client)

    assert value(samples, "reranker_backend_requests_total", backend="gpu") == 1
    assert value(samples, "reranker_backend_requests_total", backend="cpu") == 2
    assert value(samples, "reranker_gpu_fallbacks_total", reason="oom") == 1
    assert value(samples, "reranker_gpu_fallbacks_total", reason="cooldown") == 1
    assert value(samples, "reranker_stage_duration_seconds_count", stage="stage2", device="cuda:0")
    assert value(samples, "reranker_gpu_memory_free_bytes", device="cpu") == 3000 * 2**20
    assert value(samples, "reranker_gpu_memory_used_bytes", device="cpu") == 1096 * 2**20


def test_apps_have_separate_registries(make_settings: Callable[..., Settings]) -> None:
    def factory(_settings: Settings) -> Engine:
        return Engine(KeywordRunner(), gate=GpuGate(None, 0, 0))

    first, second = create_app(make_settings(), factory), create_app(make_settings(), factory)
    with (
        running(first) as url_a,
        running(second) as url_b,
        httpx.Client(base_url=url_a) as client_a,
        httpx.Client(base_url=url_b) as client_b,
    ):
        assert client_a.post("/rerank", json=BODY).status_code == 200
        a, b = scrape(client_a), scrape(client_b)
    key = {"route": "/rerank", "dialect": "native", "status": "200"}
    assert value(a, "reranker_requests_total", **key) == 1
    assert value(b, "reranker_requests_total", **key) == 0


def test_scheduler_gauges_are_scraped(make_settings) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from reranker_server.app import create_app

    from .conftest import running

    with running(create_app(make_settings())) as url:
        httpx.post(f"{url}/rerank", json={"query": "q", "documents": ["a", "b"], "top_k": 1})
        scrape = httpx.get(f"{url}/metrics").text
    assert 'reranker_queued_pairs{scheduler="cpu"} 0.0' in scrape
    assert 'reranker_busy_compute_threads{scheduler="cpu"}' in scrape


def test_process_metrics_are_exported(make_settings: Callable[..., Settings]) -> None:
    """CPU seconds and RSS of the server process (`reranker-server eval --url` reads the CPU),
    and the connections cut, by reason, from the start (0 until one is)."""

    def factory(_settings: Settings) -> Engine:
        return Engine(KeywordRunner(), gate=GpuGate(None, 0, 0))

    with (
        running(create_app(make_settings(), factory)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        samples = scrape(client)
    assert value(samples, "process_cpu_seconds_total") > 0
    rss = value(samples, "process_resident_memory_bytes")
    assert 0.5 < rss / psutil.Process().memory_info().rss < 2  # this process: the server runs here
    for reason in ("header_timeout", "body_timeout", "write_timeout"):
        assert (("reranker_connections_closed_total", frozenset({("reason", reason)}))) in samples
