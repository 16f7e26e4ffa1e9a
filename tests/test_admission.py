"""One admission path (admission.py): whatever the dialect, the request is checked as a whole
before any job runs, and errors name the field as the client wrote it. Over uvicorn on
127.0.0.1 with the keyword engine (the right order is known, no model loads)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reranker_server.errors import RerankerError
from reranker_server.service import RerankService
from reranker_server.settings import Settings
from reranker_server.types import RerankJob, RerankWork

from .fakes import KeywordRunner
from .keyword_server import DOCUMENTS, QUERY, keyword_app, keyword_engine

LIMIT = 3  # max_documents here


@pytest.fixture(scope="module")
def runner() -> KeywordRunner:
    return KeywordRunner()


@pytest.fixture(scope="module")
def server(runner: KeywordRunner) -> Iterator[str]:
    from reranker_server.devices import GpuGate
    from reranker_server.engine.engine import Engine

    from .conftest import running

    app = keyword_app(
        lambda: Engine(runner, gate=GpuGate(None, 0, 0)),
        max_documents=LIMIT,
        accepted_models="rerank-v3.5, bge-reranker",
        max_answer_bytes=48 * 1024,
    )
    with running(app) as url:
        yield url


def post(server: str, route: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps writes a lone surrogate as its \\u escape, as a client's JSON library does
    return httpx.post(f"{server}{route}", content=json.dumps(body), timeout=30)


def refused(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error: dict[str, Any] = response.json()
    return error


# --- counts: the same limit on every dialect, /v1/score pairs included


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/rerank", {"query": "q", "documents": ["a"] * (LIMIT + 1)}, "documents"),
        ("/rerank", {"query": "q", "texts": ["a"] * (LIMIT + 1)}, "texts"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * (LIMIT + 1)}, "documents"),
        ("/v2/rerank", {"query": "q", "documents": ["a"] * (LIMIT + 1)}, "documents"),
        ("/score", {"text_1": "q", "text_2": ["a"] * (LIMIT + 1)}, "text_2"),
        ("/v1/score", {"text_1": ["q"] * (LIMIT + 1), "text_2": ["a"] * (LIMIT + 1)}, "text_2"),
        (
            "/rerank/batch",
            {
                "requests": [
                    {"query": "q", "documents": ["a"]},
                    {"query": "q", "documents": ["a"] * 4},
                ]
            },
            "requests[1].documents",
        ),
    ],
)
def test_every_dialect_has_the_same_document_limit(
    server: str, runner: KeywordRunner, route: str, body: dict[str, Any], field: str
) -> None:
    calls = len(runner.calls)
    error = refused(post(server, route, body))
    assert error["field"] == field
    assert f"has {LIMIT + 1} items; the limit is {LIMIT} (max_documents)" in error["error"]
    assert len(runner.calls) == calls  # refused before any job ran


def test_pairs_at_the_limit_are_answered_in_order(server: str) -> None:
    pairs = {"text_1": [QUERY] * LIMIT, "text_2": DOCUMENTS[:LIMIT]}
    response = post(server, "/v1/score", pairs)
    assert response.status_code == 200, response.text
    single = post(server, "/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS[:LIMIT]}).json()
    assert [d["score"] for d in response.json()["data"]] == [d["score"] for d in single["data"]]


def test_five_thousand_pairs_are_refused_at_once(server: str, runner: KeywordRunner) -> None:
    calls = len(runner.calls)
    body = {"text_1": ["q"] * 5000, "text_2": ["a"] * 5000}
    error = refused(post(server, "/v1/score", body))
    assert error["field"] == "text_2" and "5000 items; the limit is 3" in error["error"]
    assert len(runner.calls) == calls


# --- fields named as the client wrote them


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text_1": "", "text_2": ["a"]}, "text_1"),
        ({"text_1": ["q", ""], "text_2": ["a", "b"]}, "text_1[1]"),
        ({"text_1": ["q", "q"], "text_2": ["a", "b" * 30_000]}, "text_2[1]"),
        ({"text_1": "q", "text_2": [1]}, "text_2[0]"),
        ({"text_1": "q", "text_2": 5}, "text_2"),
        ({"text_1": "q", "text_2": ["a", "\udfff"]}, "text_2[1]"),
        ({"text_1": ["q", "\udfff"], "text_2": ["a", "b"]}, "text_1[1]"),
        ({"text_1": "q\udfff", "text_2": "a"}, "text_1"),
        ({"text_1": "q", "text_2": "b" * 30_000}, "text_2"),
        ({"text_1": ["q", "q", "q"], "text_2": ["a", "b"]}, "text_1"),
    ],
)
@pytest.mark.parametrize("route", ["/score", "/v1/score"])
def test_score_errors_name_the_field_as_written(
    server: str, route: str, body: dict[str, Any], field: str
) -> None:
    error = refused(post(server, route, body))
    assert error["field"] == field
    assert (
        error["error"].startswith(field)
        or f" {field}" in error["error"]
        or "text_1 has" in (error["error"])
    )
    assert "query" not in error["error"] and "jobs" not in error["error"]


def test_a_batch_items_unknown_model_names_the_item(server: str) -> None:
    item = {"query": QUERY, "documents": DOCUMENTS[:2]}
    body = {"requests": [item, {**item, "model": "nope"}]}
    error = refused(post(server, "/rerank/batch", body), 404)
    assert error["field"] == "requests[1].model"
    assert "rerank-v3.5" in error["error"] and "bge-reranker" in error["error"]  # accepted names


def test_a_huge_model_name_is_cut_in_the_404(server: str) -> None:
    name = "m" * 1_000_000
    body = {"query": QUERY, "documents": DOCUMENTS[:LIMIT], "model": name}
    response = post(server, "/rerank", body)
    error = refused(response, 404)
    assert len(response.content) < 10_000
    assert error["field"] == "model" and "(1000002 characters)" in error["error"]


# --- the answer's size, refused up front


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/rerank", {"query": "q", "documents": ["x" * 19_000] * 3}, "documents"),
        (
            "/rerank",
            {"query": "q", "documents": ["x" * 15_000] * 3, "return_documents": True},
            "return_documents",
        ),
        (
            "/v2/rerank",
            {"query": "q", "documents": ["x" * 19_000] * 3, "return_documents": True},
            "return_documents",
        ),
        (
            "/rerank",
            {"query": "q", "texts": ["x" * 19_000] * 3, "return_text": True},
            "return_text",
        ),
        (
            "/rerank/batch",
            {"requests": [{"query": "q", "documents": ["x" * 19_000] * 3}] * 2},
            "requests",
        ),
    ],
)
def test_an_answer_over_the_limit_is_refused_before_any_work(
    server: str, runner: KeywordRunner, route: str, body: dict[str, Any], field: str
) -> None:
    calls = len(runner.calls)
    error = refused(post(server, route, body))
    assert error["error_type"] == "answer_too_large" and error["field"] == field
    assert "the limit is 49152 bytes (max_answer_bytes)" in error["error"]
    assert len(runner.calls) == calls


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/rerank", {"query": "q", "documents": ["x" * 19_000] * 3, "top_k": 1}),
        ("/v2/rerank", {"query": "q", "documents": ["x" * 19_000] * 3}),  # nothing echoed
        ("/rerank", {"query": "q", "texts": ["x" * 19_000] * 3}),
        ("/score", {"text_1": "q", "text_2": ["x" * 19_000] * 3}),
    ],
)
def test_an_answer_under_the_limit_is_served(server: str, route: str, body: dict[str, Any]) -> None:
    response = post(server, route, body)
    assert response.status_code == 200, response.text[:300]
    assert len(response.content) < 48 * 1024


def test_the_default_limit_refuses_a_31_mb_answer() -> None:
    """The issue's case: return_documents on 1,000 x 16,000 characters (a 31.5 MB answer)."""
    from .conftest import running

    body = {"query": "q", "documents": ["x" * 16_000] * 1000, "return_documents": True}
    with running(keyword_app()) as url:
        error = refused(post(url, "/rerank", body))
        assert error["error_type"] == "answer_too_large" and error["field"] == "return_documents"
        assert f"limit is {Settings().max_answer_bytes} bytes" in error["error"]
        body["top_k"] = 10  # the same documents, ten of them back: served
        assert post(url, "/rerank", body).status_code == 200


# --- the service refuses work that does not say what it asks for


def test_work_must_carry_its_totals() -> None:
    with pytest.raises(TypeError):
        RerankWork(build=lambda: [])  # type: ignore[call-arg]


def test_the_service_refuses_work_whose_jobs_disagree_with_its_totals() -> None:
    service = RerankService(
        Settings(stage1_model="unused", offline=True, device="cpu", cpu_threads=1),
        engine_factory=lambda _s: keyword_engine(),
    )

    async def run() -> None:
        await service.start()
        try:
            lying = RerankWork(
                documents=1,
                queries=1,
                answer_bytes=0,
                build=lambda: [RerankJob(QUERY, DOCUMENTS, 1)],  # 4 documents, not 1
            )
            with pytest.raises(RerankerError, match="declared 1 jobs with 1 documents"):
                await service.answer(lying)
            honest = RerankWork.of([RerankJob(QUERY, DOCUMENTS, 1)])
            (outcome,) = await service.answer(honest)
            assert outcome.results[0].index == 1  # BEST_FIRST[0]
        finally:
            await service.close()

    asyncio.run(run())
