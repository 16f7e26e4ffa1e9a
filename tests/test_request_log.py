"""Request logs, request ids, timing headers and the per-request cache opt-out."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.cache import MemoryScoreCache
from reranker_server.engine.engine import Engine
from reranker_server.logs import JsonFormatter, TextFormatter
from reranker_server.settings import Settings

from .conftest import running
from .fakes import KeywordRunner

SECRET_QUERY = "zebra passport number"
BODY = {
    "query": SECRET_QUERY,
    "documents": ["a zebra crossing", "my passport number is 1234", "nothing"],
    "top_k": 2,
}


def keyword_factory(cache: MemoryScoreCache) -> Callable[[Settings], Engine]:
    def build(_settings: Settings) -> Engine:
        return Engine(
            KeywordRunner(),
            gate=GpuGate(None, 0, 0),
            stage2_cpu=KeywordRunner("kw2"),
            cache=cache,
        )

    return build


@pytest.fixture
def served(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Iterator[tuple[httpx.Client, MemoryScoreCache]]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    cache = MemoryScoreCache(1 << 20)
    app = create_app(make_settings(**overrides), keyword_factory(cache))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, cache


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "reranker_server.access"
    ]


def test_one_json_line_per_request_without_text(
    served: tuple[httpx.Client, MemoryScoreCache], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = served
    with caplog.at_level(logging.INFO, logger="reranker_server.access"):
        response = client.post("/rerank", json=BODY, headers={"X-Request-ID": "trace-42"})
        client.get("/health/live")  # health checks log at DEBUG only
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42"
    [line] = access_lines(caplog)
    assert line["request_id"] == "trace-42"
    assert line["route"] == "/rerank" and line["dialect"] == "native"
    assert line["status"] == 200 and line["method"] == "POST"
    assert (
        line["documents"] == 3 and line["top_k"] == 2 and line["tokens"] == 24
    )  # fake runner: words + 2 per pair
    assert line["backend"] == "cpu" and line["client"] == "127.0.0.1"
    assert set(line["stages_ms"]) == {"stage1", "stage2"}
    assert line["cache_hits"] == 0 and line["cache_misses"] == 3 + 3
    assert line["duration_ms"] > 0 and "ts" in line and line["level"] == "INFO"
    raw = " ".join(JsonFormatter().format(r) + TextFormatter().format(r) for r in caplog.records)
    assert "zebra" not in raw and "passport" not in raw


@pytest.mark.parametrize("served", [{"log_payloads": True}], indirect=True)
def test_log_payloads_setting_logs_text(
    served: tuple[httpx.Client, MemoryScoreCache], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = served
    with caplog.at_level(logging.INFO, logger="reranker_server.access"):
        client.post("/rerank", json=BODY)
    [line] = access_lines(caplog)
    assert line["query"] == SECRET_QUERY
    assert line["document_texts"] == BODY["documents"]


def test_request_id_generated_when_missing_or_unsafe(
    served: tuple[httpx.Client, MemoryScoreCache],
) -> None:
    client, _ = served
    generated = client.post("/rerank", json=BODY).headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    unsafe = client.post("/rerank", json=BODY, headers={"X-Request-ID": "a b\tc"})
    assert unsafe.headers["x-request-id"] != "a b\tc"
    too_long = client.post("/rerank", json=BODY, headers={"X-Request-ID": "x" * 129})
    assert len(too_long.headers["x-request-id"]) == 32
    error = client.post("/rerank", json={"query": "q"}, headers={"X-Request-ID": "err-1"})
    assert error.status_code == 422 and error.headers["x-request-id"] == "err-1"


def test_timing_headers(served: tuple[httpx.Client, MemoryScoreCache]) -> None:
    client, _ = served
    response = client.post("/rerank", json=BODY)
    assert float(response.headers["x-process-time"]) > 0
    timing = dict(
        part.strip().split(";dur=") for part in response.headers["server-timing"].split(",")
    )
    assert set(timing) == {"queue", "stage1", "stage2"}
    assert all(float(ms) >= 0 for ms in timing.values())


def post_raw(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """POST with Python's own http.client (it refuses a header line over 64 KiB)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        payload = json.dumps(body)
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def timing_entries(header: str) -> list[tuple[str, float]]:
    return [(name, float(ms)) for name, ms in (p.strip().split(";dur=") for p in header.split(","))]


def test_server_timing_sums_each_stage_over_a_batch(
    served: tuple[httpx.Client, MemoryScoreCache], caplog: pytest.LogCaptureFixture
) -> None:
    """One entry per stage name however many jobs ran, each the sum of the jobs' stage times
    (the answer's per-job `seconds`); the log line says the same."""
    client, _ = served
    jobs = [{**BODY, "query": f"{SECRET_QUERY} {i}"} for i in range(32)]
    with caplog.at_level(logging.INFO, logger="reranker_server.access"):
        response = client.post("/rerank/batch", json={"requests": jobs})
    assert response.status_code == 200
    entries = timing_entries(response.headers["server-timing"])
    assert [name for name, _ in entries] == ["queue", "stage1", "stage2"]
    timing = dict(entries)
    answers = response.json()["responses"]
    for index, stage in enumerate(("stage1", "stage2")):
        total_ms = sum(answer["stages"][index]["seconds"] for answer in answers) * 1000
        assert timing[stage] == pytest.approx(total_ms, abs=0.05)
    [line] = access_lines(caplog)
    assert line["stages_ms"] == pytest.approx(
        {k: timing[k] for k in ("stage1", "stage2")}, abs=0.01
    )
    assert line["queue_wait_ms"] == pytest.approx(timing["queue"], abs=0.01)
    assert line["documents"] == 32 * 3


def test_server_timing_stays_small_for_many_score_pairs(
    served: tuple[httpx.Client, MemoryScoreCache],
) -> None:
    """1,000 pairs on /v1/score (one job each) answer with the same three timing entries, a
    header line of well under 1 KB, readable by http.client."""
    client, _ = served
    pairs = 1000
    body = {"text_1": ["zebra"] * pairs, "text_2": [f"zebra {i}" for i in range(pairs)]}
    status, headers, raw = post_raw(str(client.base_url), "/v1/score", body)
    assert status == 200 and len(json.loads(raw)["data"]) == pairs
    timing = headers["server-timing"]
    assert [name for name, _ in timing_entries(timing)] == ["queue", "stage1", "stage2"]
    assert len(timing) < 1024
    assert sum(len(k) + len(v) for k, v in headers.items()) < 2048


@pytest.mark.parametrize(
    "header",
    [{"Cache-Control": "no-cache"}, {"Cache-Control": "no-store"}, {"X-Reranker-Cache": "off"}],
)
def test_cache_opt_out_per_request(
    served: tuple[httpx.Client, MemoryScoreCache],
    caplog: pytest.LogCaptureFixture,
    header: dict[str, str],
) -> None:
    client, cache = served
    with caplog.at_level(logging.INFO, logger="reranker_server.access"):
        opted_out = client.post("/rerank", json=BODY, headers=header).json()
    assert [s["cached"] for s in opted_out["stages"]] == [None, None]
    assert cache.stats()["entries"] == 0
    assert access_lines(caplog)[0]["cache"] == "off"
    client.post("/rerank", json=BODY)
    again = client.post("/rerank", json=BODY).json()
    assert [s["cached"] for s in again["stages"]] == [3, 3]


def test_cache_disabled_setting(make_settings: Callable[..., Settings]) -> None:
    from reranker_server.engine.loader import build_cache

    assert build_cache(make_settings(cache_enabled=False)) is None
    assert isinstance(build_cache(make_settings()), MemoryScoreCache)


def test_configure_logging_writes_json_lines() -> None:
    code = (
        "import logging; from reranker_server.logs import configure_logging;"
        "configure_logging('info', 'json');"
        "logging.getLogger('reranker_server.x').info('hello %s', 'you', extra={'fields': {'n': 1}})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert (
        line["message"] == "hello you" and line["n"] == 1 and line["logger"] == "reranker_server.x"
    )


def test_text_format_appends_fields() -> None:
    record = logging.LogRecord(
        "reranker_server.access", logging.INFO, "f", 1, "POST /rerank", (), None
    )
    record.fields = {"status": 200, "route": "/rerank", "fallback": None}
    text = TextFormatter().format(record)
    assert text.endswith('POST /rerank status=200 route="/rerank"')
