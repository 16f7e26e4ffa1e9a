"""The Redis score cache against a real redis-server, including Redis dying mid-run."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.engine.cache import RedisScoreCache
from reranker_server.settings import Settings

from .conftest import running
from .fakes import FakeClock
from .redis_server import RedisServer

BODY = {
    "query": "capital of france",
    "documents": ["paris is the capital of france", "berlin is in germany", "bananas", "rome"],
    "top_k": 3,
}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_round_trip_is_exact_and_expires(redis_server: RedisServer) -> None:
    import redis

    cache = RedisScoreCache(redis_server.url, ttl_s=120)
    scores = {"a": 0.1 + 0.2, "b": 1 / 3, "c": 5e-324}
    cache.set_many(scores)
    assert cache.get_many(["a", "b", "c", "missing"]) == [*scores.values(), None]
    ttl = redis.Redis.from_url(redis_server.url).ttl("reranker:score:a")
    assert 0 < ttl <= 120
    assert cache.stats() == {"errors": 0, "available": True}
    cache.close()


def test_redis_down_degrades_to_misses_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    cache = RedisScoreCache(redis_server.url, timeout_s=0.2, retry_after_s=5, clock=clock)
    cache.set_many({"k": 0.25})
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="reranker_server.engine.cache"):
        assert cache.get_many(["k"]) == [None]
        cache.set_many({"k2": 0.5})  # inside the rest period: not even tried
        assert cache.get_many(["k"]) == [None]
    assert cache.stats() == {"errors": 1, "available": False}
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per request

    redis_server.start()  # a fresh, empty Redis on the same port
    clock.now += 6
    cache.set_many({"k": 0.75})
    assert cache.get_many(["k"]) == [0.75]
    assert cache.stats()["available"] is True
    cache.close()


def test_server_with_redis_survives_redis_dying(
    redis_server: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(cache_url=redis_server.url, stage2_on_cpu=True, cache_timeout_s=0.2)
    with running(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = client.post("/rerank", json=BODY)
        second = client.post("/rerank", json=BODY)
        assert first.status_code == second.status_code == 200
        assert [s["cached"] for s in second.json()["stages"]] == [4, 4]
        assert second.json()["results"] == first.json()["results"]

        redis_server.kill()
        for _ in range(3):
            answer = client.post("/rerank", json=BODY)
            assert answer.status_code == 200
            assert answer.json()["results"] == first.json()["results"]
            assert [s["cached"] for s in answer.json()["stages"]] == [0, 0]
        metrics = client.get("/metrics").text
        assert 'reranker_cache_up{backend="redis"} 0.0' in metrics
        assert 'reranker_cache_errors_total{backend="redis"} 1.0' in metrics
