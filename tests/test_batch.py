"""`POST /rerank/batch`: answers in request order, each equal to the single request's, run as one
unit of work in the pool, and its limits and item errors named precisely."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reranker_server.app import RerankerApp

from .conftest import running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

QUERIES = [QUERY, "bananas", "Germany Berlin capital", "Eiffel Tower Paris"]


class CountingPool:
    """Wraps the app's pool to count units of work."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def run(self, fn: Any, deadline: float | None = None) -> Any:
        self.runs += 1
        return await self.pool.run(fn, deadline)


@pytest.fixture(scope="module")
def app() -> RerankerApp:
    return keyword_app(max_batch_requests=4, max_documents=5)


@pytest.fixture(scope="module")
def server(app: RerankerApp) -> Iterator[str]:
    with running(app) as url:
        app.service.pool = CountingPool(app.service.pool)  # type: ignore[assignment]
        yield url


def single(server: str, query: str, top_k: int) -> list[tuple[int, float]]:
    body = {"query": query, "documents": DOCUMENTS, "top_k": top_k}
    return [
        (r["index"], r["score"])
        for r in httpx.post(f"{server}/rerank", json=body).json()["results"]
    ]


def test_batch_answers_in_order_and_equals_single_requests(server: str, app: RerankerApp) -> None:
    body = {
        "requests": [
            {"query": q, "documents": DOCUMENTS, "top_k": k}
            for q, k in zip(QUERIES, [2, 1, 4, 3], strict=True)
        ]
    }
    pool: Any = app.service.pool
    before = pool.runs
    response = httpx.post(f"{server}/rerank/batch", json=body)
    assert response.status_code == 200, response.text
    assert pool.runs == before + 1  # one unit of work, not one per query
    answers = response.json()["responses"]
    assert [a["results"][0]["index"] for a in answers] == [BEST_FIRST[0], 3, 0, 2]
    for answer, item in zip(answers, body["requests"], strict=True):
        got = [(r["index"], r["score"]) for r in answer["results"]]
        assert got == single(server, item["query"], item["top_k"])


def test_batch_items_take_the_lenient_native_fields(server: str) -> None:
    body = {
        "requests": [
            {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": None},
            {"query": QUERY, "documents": DOCUMENTS, "top_n": 1, "return_documents": "true"},
        ]
    }
    answers = httpx.post(f"{server}/rerank/batch", json=body).json()["responses"]
    assert [r["index"] for r in answers[0]["results"]] == BEST_FIRST
    assert answers[1]["results"][0]["document"] == {"text": DOCUMENTS[BEST_FIRST[0]]}


def test_empty_batch(server: str) -> None:
    response = httpx.post(f"{server}/rerank/batch", json={"requests": []})
    assert response.status_code == 200 and response.json()["responses"] == []


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"requests": [{"query": "q", "documents": ["a"], "top_k": 1}] * 5}, "requests", "4"),
        (
            {"requests": [{"query": "q", "documents": ["a"], "top_k": 0}]},
            "requests[0].top_k",
            "top_k",
        ),
        (
            {"requests": [{"query": "q", "documents": ["a"], "top_k": 1}, {"documents": ["a"]}]},
            "requests[1].query",
            "query",
        ),
        (
            {"requests": [{"query": " ", "documents": ["a"], "top_k": 1}]},
            "requests[0].query",
            "empty",
        ),
        (
            {"requests": [{"query": "q", "documents": ["a"] * 6, "top_k": 1}]},
            "requests[0].documents",
            "max_documents",
        ),
        (
            {"requests": [{"query": "q", "documents": ["a", 7], "top_k": 1}]},
            "requests[0].documents[1]",
            "string",
        ),
        ({"requests": "all of them"}, "requests", "list"),
        ({}, "requests", "required"),
    ],
)
def test_batch_errors_name_the_item(server: str, body: Any, field: str, words: str) -> None:
    response = httpx.post(f"{server}/rerank/batch", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field and words in error["detail"]
