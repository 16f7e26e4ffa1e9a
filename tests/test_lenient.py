"""Sloppy and odd bodies: what clients really send is read leniently, anything else is a 4xx that
names the field -- never a 500 -- on every rerank route. And the `model` field's rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

ROUTES = ["/rerank", "/v1/rerank", "/v2/rerank", "/rerank/batch"]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running(keyword_app(max_documents=10)) as url:
        yield url


@pytest.fixture(scope="module")
def strict_models() -> Iterator[str]:
    with running(keyword_app(accepted_models="rerank-v3.5, bge-reranker")) as url:
        yield url


ODD_BODIES: list[Any] = [
    None,
    [],
    [1, 2],
    "text",
    42,
    {},
    {"query": None, "documents": ["a"]},
    {"query": ["q"], "documents": ["a"]},
    {"query": "q", "documents": None},
    {"query": "q", "documents": {"0": "a"}},
    {"query": "q", "documents": [["a"]]},
    {"query": "q", "documents": [{"title": "no text field"}], "top_n": 1},
    {"query": "q", "documents": ["a"], "top_n": -1},
    {"query": "q", "documents": ["a"], "top_n": "many"},
    {"query": "q", "documents": ["a"], "top_n": 1.5},
    {"query": "q", "documents": ["a"], "top_n": 10**30},
    {"query": "q", "documents": ["a"], "return_documents": "maybe"},
    {"query": "q", "documents": ["a"], "rank_fields": "text"},
    {"query": "q", "documents": ["a"] * 11, "top_n": 1},
    {"query": "q", "texts": None},
    {"query": "q", "texts": [1]},
    {"texts": ["a"]},
    {"query": "q", "texts": ["a"], "raw_scores": "sometimes"},
    {"requests": None},
    {"requests": [None]},
    {"requests": [{"query": "q", "documents": ["a"], "top_k": 1}] * 33},
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", ODD_BODIES, ids=lambda b: repr(b)[:40])
def test_odd_bodies_get_a_4xx_or_an_answer_never_a_5xx(server: str, route: str, body: Any) -> None:
    response = httpx.post(server + route, json=body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()
        assert error["error_type"] in {"invalid_request", "invalid_json"}
        assert error["field"] and error["detail"] == error["error"]


def test_unknown_fields_nulls_and_string_booleans(server: str) -> None:
    body = {
        "query": QUERY,
        "documents": DOCUMENTS,
        "top_n": "2",
        "return_documents": "false",
        "rank_fields": None,
        "max_chunks_per_doc": None,
        "score_threshold": 0.4,
        "user": {"id": 7},
        "instruction": "ignored",
    }
    for route in ("/v1/rerank", "/v2/rerank", "/rerank"):
        data = httpx.post(server + route, json=body).json()
        assert [r["index"] for r in data["results"]] == BEST_FIRST[:2], route
        assert all("document" not in r for r in data["results"])


def test_top_n_variants_mean_what_clients_mean(server: str) -> None:
    def count(top_n: Any) -> int:
        body = {"query": QUERY, "documents": DOCUMENTS, "top_n": top_n}
        results = httpx.post(f"{server}/v1/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == BEST_FIRST[: len(results)]
        return len(results)

    n = len(DOCUMENTS)
    assert [count(t) for t in (None, 0, 1, n - 1, n, n + 5, "3", 2.0)] == [
        n,
        n,
        1,
        n - 1,
        n,
        n,
        3,
        2,
    ]
    missing = httpx.post(f"{server}/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert len(missing.json()["results"]) == n


def test_empty_documents(server: str) -> None:
    for route, body in [
        ("/v1/rerank", {"query": "q", "documents": []}),
        ("/rerank", {"query": "q", "texts": []}),
    ]:
        response = httpx.post(server + route, json=body)
        assert response.status_code == 200, route
        data = response.json()
        assert (data if isinstance(data, list) else data["results"]) == []


def test_any_model_name_is_served_by_default_and_the_answer_names_the_server(server: str) -> None:
    for route in ("/v1/rerank", "/v2/rerank", "/rerank"):
        body = {"model": "rerank-v3.5", "query": QUERY, "documents": DOCUMENTS, "top_n": 1}
        data = httpx.post(server + route, json=body).json()
        assert data["model"] == "keyword"  # the runner that produced the order


def test_accepted_models_refuse_other_names_with_a_404(strict_models: str) -> None:
    ok = {"query": QUERY, "documents": DOCUMENTS, "top_n": 1}
    for name in ("rerank-v3.5", "bge-reranker", "keyword", None):
        response = httpx.post(f"{strict_models}/v2/rerank", json={**ok, "model": name})
        assert response.status_code == 200, name
    cases = [
        ("/v2/rerank", {**ok, "model": "gpt-4"}, "model"),
        ("/rerank", {**ok, "model": "gpt-4"}, "model"),
        ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "model": "gpt-4"}, "model"),
        ("/rerank/batch", {"requests": [{**ok, "model": "gpt-4"}]}, "requests[0].model"),
        ("/rerank/batch", {"requests": [ok], "model": "gpt-4"}, "model"),
    ]
    for route, body, field in cases:
        response = httpx.post(strict_models + route, json=body)
        assert response.status_code == 404, route
        error = response.json()
        assert error["error_type"] == "model_not_found" and error["field"] == field
        assert "rerank-v3.5" in error["detail"] and "accepted_models" in error["detail"]
