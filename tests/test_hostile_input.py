"""A catalogue of hostile request bodies: each gets the right status quickly, never a 5xx, and
the server's memory does not blow up (the body limit holds before anything is parsed)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from reranker_server.app import create_app
from reranker_server.server import uvicorn_options
from reranker_server.settings import Settings

from .conftest import running
from .keyword_server import keyword_app

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


def deep_document(levels: int) -> dict[str, object]:
    """An object document nesting `levels` objects (itself included)."""
    document: dict[str, object] = {"text": "paris"}
    for _ in range(levels - 1):
        document = {"text": "paris", "more": document}
    return document


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
    (
        "lone surrogate in a document",
        b'{"query": "q", "documents": ["ok", "\\ud800 x"], "top_k": 2}',
        {},
        422,
        "invalid_request",
    ),
    (
        "lone surrogate in an object document, echoed",
        b'{"query": "q", "documents": [{"text": "a", "meta": {"tag": "\\udfff"}}], '
        b'"top_k": 1, "return_documents": true}',
        {},
        422,
        "invalid_request",
    ),
    (
        "lone surrogate in an object key",
        b'{"query": "q", "documents": [{"text": "a", "k\\ud83d": 1}], "top_k": 1}',
        {},
        422,
        "invalid_request",
    ),
    (
        "lone surrogate in rank_fields",
        b'{"query": "q", "documents": [{"text": "a"}], "top_k": 1, "rank_fields": ["t\\udc00"]}',
        {},
        422,
        "invalid_request",
    ),
    (
        "lone surrogate in TEI texts",
        b'{"query": "q", "texts": ["a", "\\ud800"]}',
        {},
        422,
        "invalid_request",
    ),
    (
        "surrogate pair (valid emoji escape)",
        b'{"query": "q \\ud83d\\ude00", "documents": ["\\ud83d\\ude00 paris"], "top_k": 1}',
        {},
        200,
        None,
    ),
    (
        "object document 300 levels deep, echoed",
        body(documents=[deep_document(300)], return_documents=True),
        {},
        422,
        "invalid_request",
    ),
    (
        "object document 64 levels deep, echoed",
        body(documents=[deep_document(64)], return_documents=True),
        {},
        200,
        None,
    ),
    ("top_n true", body(top_k=None, top_n=True), {}, 422, "invalid_request"),
    ("max_chunks_per_doc true", body(max_chunks_per_doc=True), {}, 422, "invalid_request"),
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
    with running(create_app(settings), **uvicorn_options(settings)) as url:
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
    # A hang fails through the client's timeout; no wall-clock assert (the box is shared).
    response = httpx.post(
        f"{hostile_server}/rerank",
        content=raw,
        timeout=30,
        headers={"Content-Type": "application/json", **headers},
    )
    assert response.status_code == status, response.text[:500]
    assert server.memory_info().rss - rss_before < 300 * MB
    payload = response.json()
    if error_type is None:
        assert payload["results"] and all(0 <= r["score"] <= 1 for r in payload["results"])
    else:
        assert payload["error_type"] == error_type
        assert "Traceback" not in response.text and "/site-packages/" not in response.text
    assert httpx.get(f"{hostile_server}/health").json()["status"] == "ok"  # still serving


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 28


SURROGATE = "\ud800"  # a lone UTF-16 surrogate: JSON can carry it, UTF-8 cannot

# (route, body with a lone surrogate or a boolean count somewhere, the field the 422 must name)
FIELD_CASES: list[tuple[str, dict[str, object], str]] = [
    ("/rerank", {"query": "q", "documents": ["a", SURROGATE], "top_k": 1}, "documents[1]"),
    ("/rerank", {"query": "q", "texts": ["a", SURROGATE]}, "texts[1]"),
    ("/rerank", {"query": "q" + SURROGATE, "documents": ["a"], "top_k": 1}, "query"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": False}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": SURROGATE}]}, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
    (
        "/v2/rerank",
        {"query": "q", "documents": [{"text": "a", "x": [SURROGATE]}], "return_documents": True},
        "documents[0]",
    ),
    (
        "/v2/rerank",
        {"query": "q", "documents": ["a"], "max_tokens_per_doc": True},
        "max_tokens_per_doc",
    ),
    (
        "/v2/rerank",
        {"query": "q", "documents": [{"t": "a"}], "rank_fields": ["t", SURROGATE]},
        "rank_fields[1]",
    ),
    (
        "/rerank/batch",
        {
            "requests": [
                {"query": "q", "documents": ["a"], "top_k": 1},
                {"query": "q", "documents": ["b", "c" + SURROGATE], "top_k": 1},
            ]
        },
        "requests[1].documents[1]",
    ),
    (
        "/rerank/batch",
        {"requests": [{"query": "q", "documents": [deep_document(100)], "top_k": 1}]},
        "requests[0].documents[0]",
    ),
]


@pytest.mark.parametrize(("route", "payload", "field"), FIELD_CASES)
def test_every_route_names_the_field(
    hostile_server: str, route: str, payload: dict[str, object], field: str
) -> None:
    # json.dumps writes a lone surrogate as the escape \ud800, as a client's JSON library would
    response = httpx.post(f"{hostile_server}{route}", content=json.dumps(payload), timeout=30)
    assert response.status_code == 422, response.text[:300]
    assert response.json()["field"] == field
    assert response.json()["error_type"] == "invalid_request"


def test_an_h2c_upgrade_header_is_ignored_and_the_body_read(hostile_server: str) -> None:
    """`curl --http2` on a plain-HTTP URL asks to upgrade; the answer is HTTP/1.1 with the body
    read (stock uvicorn + httptools drops it: a 422 "body: Field required")."""
    upgrade = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA",
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=hostile_server, timeout=30) as client:
        for query in ("capital of france", "capital of germany"):  # twice on one connection
            response = client.post("/rerank", content=body(query=query), headers=upgrade)
            assert response.status_code == 200, response.text[:300]
            assert response.http_version == "HTTP/1.1"
            assert len(response.json()["results"]) == 2


# --- every route in the OpenAPI document, one catalogue
#
# The walk reads the routes from the app's own OpenAPI document, so a route added tomorrow is
# walked the day it is added (a POST route without an example body fails
# `test_the_walk_covers_every_route`). For each example body it puts each catalogue value at
# every place in the body (each field of the request's schema, each list item, each field of a
# nested object) and asserts: never a 5xx, and a 4xx is JSON that names the field hit (or one
# around it). A lone surrogate anywhere is a 422 naming where it is.

HUGE_COUNT = 20_000  # over every count limit (max_documents, max_batch_requests)
HUGE_STRING = "a" * 256 * 1024  # over every length limit (document, query characters)
NESTED = json.loads("[" * 200 + "]" * 200)

# (name, value); "surrogate" is checked strictly (422 naming the place).
CATALOGUE: list[tuple[str, object]] = [
    ("surrogate", "a\udfff"),
    ("nested", NESTED),
    ("true", True),
    ("false", False),
    ("huge count", None),  # a list of HUGE_COUNT copies of what is there (see `hostile`)
    ("huge string", HUGE_STRING),
    ("object", {"x": {"y": [1, None]}}),
    ("float", 1.5),
    ("huge int", 10**30),
    ("negative", -1),
    ("null", None),
]

API_SCHEMA = create_app(Settings()).openapi()  # routes only: an app never started

Path = tuple[str | int, ...]


def _resolve(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas a request body schema stands for (a $ref, or one of several)."""
    if "$ref" in schema:
        return [API_SCHEMA["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]]
    return [s for option in schema.get("oneOf", schema.get("anyOf", [])) for s in _resolve(option)]


def example_bodies() -> list[tuple[str, dict[str, Any], list[str]]]:
    """(path, example body, the top-level fields of its schema) for every POST route."""
    found = []
    for path, methods in API_SCHEMA["paths"].items():
        content = methods.get("post", {}).get("requestBody", {}).get("content", {})
        media = content.get("application/json", {})
        schemas = _resolve(media.get("schema", {}))
        examples = [e["value"] for e in media.get("examples", {}).values()]
        examples += [e for s in schemas for e in s.get("examples", [])]
        for example in examples:
            # the schema the example is written in: the one whose required fields it has
            fields = [
                name
                for s in schemas
                if set(s.get("required", [])) <= set(example)
                for name in s["properties"]
            ]
            found.append((path, example, fields))
    return found


def _places(value: object, path: Path = ()) -> list[Path]:
    """Every place in a JSON value: itself, each list item, each object field (recursively)."""
    places = [path]
    if isinstance(value, list):
        for i, item in enumerate(value):
            places += _places(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            places += _places(item, (*path, key))
    return places


def _field(path: Path) -> str:
    """A place as errors name it: `requests[1].documents[0]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def hostile(body: dict[str, Any], path: Path, name: str, value: object) -> dict[str, Any]:
    """`body` with `value` put at `path` (a copy)."""
    copy = json.loads(json.dumps(body))
    parent: Any = copy
    for part in path[:-1]:
        parent = parent[part]
    if name == "huge count":
        current = parent[path[-1]] if path[-1] in parent or isinstance(parent, list) else "a"
        value = (current if isinstance(current, list) else [current]) * HUGE_COUNT
        if isinstance(current, list) and current:
            value = current[:1] * HUGE_COUNT
    parent[path[-1]] = value
    return copy


def walk_cases() -> list[tuple[str, dict[str, Any], str, Path]]:
    cases = []
    for route, example, fields in example_bodies():
        places = {p for p in _places(example) if p} | {(name,) for name in fields}
        for place in sorted(places, key=str):
            for name, value in CATALOGUE:
                cases.append((route, hostile(example, place, name, value), name, place))
    return cases


@pytest.fixture(scope="module")
def walk_server() -> Iterator[str]:
    """The keyword engine (scores in microseconds) behind the real HTTP stack."""
    with running(keyword_app(), **uvicorn_options(Settings())) as url:
        yield url


def _related(field: str, place: str) -> bool:
    """The error names the place hit, a field around it, or a part inside it."""
    return (
        field in ("body", place)
        or place.startswith((f"{field}.", f"{field}["))
        or (field.startswith((f"{place}.", f"{place}[")))
    )


def test_every_route_survives_the_catalogue(walk_server: str) -> None:
    cases = walk_cases()
    failures = []
    with httpx.Client(base_url=walk_server, timeout=60) as client:
        for route, payload, name, place in cases:
            response = client.post(route, content=json.dumps(payload))
            where = f"{route} {name} at {_field(place)}: {response.status_code}"
            if response.status_code >= 500:
                failures.append(f"{where} {response.text[:200]}")
                continue
            if response.status_code < 400:
                if name == "surrogate":
                    failures.append(f"{where} (a lone surrogate was accepted)")
                continue
            error = response.json()
            field = error.get("field")
            if not (isinstance(field, str) and field and error.get("error_type")):
                failures.append(f"{where} error without a field: {response.text[:200]}")
            elif not _related(field, _field(place)):
                failures.append(f"{where} names {field!r}")
            elif name == "surrogate" and response.status_code != 422:
                failures.append(f"{where} (expected 422)")
    assert len(cases) > 500  # every POST route, every place, every value
    assert failures == []


def test_every_get_route_survives_a_hostile_query_string(walk_server: str) -> None:
    junk = {"top_k": "true", "x": "\udfff".encode("utf-8", "surrogatepass").decode("latin-1")}
    gets = [p for p, methods in API_SCHEMA["paths"].items() if "get" in methods]
    for path in gets:
        response = httpx.get(f"{walk_server}{path}", params={**junk, "y": "a" * 4000}, timeout=30)
        assert response.status_code < 500, (path, response.text[:200])


def test_the_walk_covers_every_route() -> None:
    walked = {route for route, _, _ in example_bodies()}
    posts = {p for p, methods in API_SCHEMA["paths"].items() if "post" in methods}
    assert walked == posts  # a POST route without an example body would go unwalked
    assert {"/rerank", "/rerank/batch", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"} <= posts
