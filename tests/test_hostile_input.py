"""A catalogue of hostile request bodies: each gets the right status quickly, never a 5xx, and
the server's memory does not blow up (the body limit holds before anything is parsed)."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from reranker_server.app import create_app
from reranker_server.settings import Settings

from .conftest import running

MB = 1024 * 1024


def body(**fields: object) -> bytes:
    base: dict[str, object] = {
        "query": "capital of france",
        "documents": ["paris", "berlin"],
        "top_k": 2,
    }
    base.update(fields)
    return json.dumps(base).encode()


def nested(depth: int) -> bytes:
    return b'{"query": "q", "documents": ' + b"[" * depth + b"]" * depth + b', "top_k": 1}'


# (name, raw body, extra headers, expected status, expected error_type or None for 200)
CASES: list[tuple[str, bytes, dict[str, str], int, str | None]] = [
    (
        "wrong types",
        b'{"query": ["q"], "documents": {"a": 1}, "top_k": true}',
        {},
        422,
        "invalid_request",
    ),
    (
        "nested garbage",
        body(documents=[[["a", {"b": [None]}]], {"c": {"d": []}}]),
        {},
        422,
        "invalid_request",
    ),
    (
        "10 MB body",
        b'{"query": "q", "documents": ["' + b"a" * (10 * MB) + b'"], "top_k": 1}',
        {},
        413,
        "payload_too_large",
    ),
    ("100,000 documents", body(documents=["a"] * 100_000), {}, 422, "invalid_request"),
    ("300,000 wrong-typed documents", body(documents=[1] * 300_000), {}, 422, "invalid_request"),
    (
        "300,000 wrong-typed TEI texts",
        json.dumps({"query": "q", "texts": [None] * 300_000}).encode(),
        {},
        422,
        "invalid_request",
    ),
    ("5 MB document", body(documents=["a" * (5 * MB // 2)]), {}, 422, "invalid_request"),
    (
        "NUL bytes",
        body(query="capital\u0000 of france", documents=["pa\u0000ris", "\u0000"]),
        {},
        200,
        None,
    ),
    (
        "lone surrogates",
        b'{"query": "q\\ud800", "documents": ["\\udfff x", "ok"], "top_k": 2}',
        {},
        422,
        "invalid_request",
    ),
    ("emoji", body(query="🇫🇷 capital? 🤔", documents=["Paris 🗼🥖", "👍" * 500]), {}, 200, None),
    (
        "RTL text",
        body(query="ما هي عاصمة فرنسا", documents=["باريس هي عاصمة فرنسا", "שלום"]),
        {},
        200,
        None,
    ),
    ("deeply nested JSON", nested(100_000), {}, 400, "invalid_json"),
    (
        "duplicate keys",
        b'{"query": "q", "top_k": 0, "documents": ["a"], "top_k": 1}',
        {},
        200,
        None,
    ),
    (
        "non-UTF-8 bytes",
        b'{"query": "caf\xe9", "documents": ["\xff\xfe"], "top_k": 1}',
        {},
        400,
        "invalid_json",
    ),
    (
        "gzip bomb",
        gzip.compress(body(documents=["a" * 1000] * 3000)),
        {"Content-Encoding": "gzip"},
        415,
        "unsupported_media_type",
    ),
    ("empty body", b"", {}, 422, "invalid_request"),
    ("JSON null", b"null", {}, 422, "invalid_request"),
    ("huge top_k", body(top_k=10**30), {}, 200, None),
    ("negative zero top_k", body(top_k=-0), {}, 422, "invalid_request"),
    (
        "form data",
        b"query=q&top_k=1",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
]


@pytest.fixture(scope="module")
def hostile_server(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        offline=True,
        device="cpu",
        cpu_threads=1,
        max_body_bytes=8 * MB,
    )
    with running(create_app(settings)) as url:
        yield url


@pytest.mark.parametrize(
    ("name", "raw", "headers", "status", "error_type"), CASES, ids=[c[0] for c in CASES]
)
def test_hostile_body(
    hostile_server: str,
    name: str,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    error_type: str | None,
) -> None:
    server = psutil.Process(os.getpid())  # the server runs in this process (a thread)
    rss_before = server.memory_info().rss
    started = time.perf_counter()
    response = httpx.post(
        f"{hostile_server}/rerank",
        content=raw,
        timeout=30,
        headers={"Content-Type": "application/json", **headers},
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == status, response.text[:500]
    assert elapsed < 2, f"{name} took {elapsed:.1f} s"
    assert server.memory_info().rss - rss_before < 300 * MB
    payload = response.json()
    if error_type is None:
        assert payload["results"] and all(0 <= r["score"] <= 1 for r in payload["results"])
    else:
        assert payload["error_type"] == error_type
        assert "Traceback" not in response.text and "/site-packages/" not in response.text
    assert httpx.get(f"{hostile_server}/health").json()["status"] == "ok"  # still serving


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 18
