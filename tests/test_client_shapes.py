"""The client shapes of vLLM, Infinity, LiteLLM, Weaviate and Dify, over a real socket: a
/rerank body without top_k or top_n, TEI bodies with top_n, `GET /info`, `GET /v1/models`, vLLM's
score API, and `usage.prompt_tokens`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .conftest import running
from .fakes import KeywordRunner
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running(keyword_app(accepted_models="rerank-v3.5")) as url:
        yield url


def test_rerank_without_top_k_or_top_n_answers_every_document(server: str) -> None:
    # what LiteLLM's hosted_vllm/, together_ai/ and infinity/ providers, cohere 5.6 (on /rerank)
    # and Weaviate's reranker-transformers module send
    body = {"model": "rerank-v3.5", "query": QUERY, "documents": DOCUMENTS}
    answer = httpx.post(f"{server}/rerank", json=body).json()
    assert [r["index"] for r in answer["results"]] == BEST_FIRST
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"]


def test_tei_body_honours_top_n(server: str) -> None:
    # LiteLLM's huggingface/ provider: TEI's body plus top_n
    body = {"query": QUERY, "texts": DOCUMENTS, "top_n": 2, "return_text": True}
    answer = httpx.post(f"{server}/rerank", json=body).json()
    assert [r["index"] for r in answer] == BEST_FIRST[:2]
    assert answer[0]["text"] == DOCUMENTS[BEST_FIRST[0]]


def test_info_in_tei_shape_says_reranker(server: str) -> None:
    info = httpx.get(f"{server}/info").json()
    # Dify's TEI provider: the first key of model_type must be "reranker"
    assert list(info["model_type"]) == ["reranker"]
    assert info["model_id"] == "keyword" and info["max_input_length"] == 512
    assert info["max_client_batch_size"] >= 1


def test_v1_models_lists_the_names_in_openai_shape(server: str) -> None:
    listing = httpx.get(f"{server}/v1/models").json()
    assert listing["object"] == "list"
    # the cascade (`default` without a cascades file), its model, the accepted names
    assert {m["id"] for m in listing["data"]} == {"default", "keyword", "rerank-v3.5"}
    assert all(m["object"] == "model" for m in listing["data"])


@pytest.mark.parametrize("route", ["/score", "/v1/score"])
def test_vllm_score_one_query_against_many(server: str, route: str) -> None:
    body = {"model": "rerank-v3.5", "text_1": QUERY, "text_2": DOCUMENTS}
    answer = httpx.post(f"{server}{route}", json=body).json()
    assert answer["object"] == "list" and answer["model"] == "keyword"
    assert [d["index"] for d in answer["data"]] == list(range(len(DOCUMENTS)))  # input order
    expected = KeywordRunner().score(QUERY, DOCUMENTS)
    assert [d["score"] for d in answer["data"]] == pytest.approx(expected)
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"]
    # the same scores as /rerank answering every document
    ranked = httpx.post(f"{server}/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    by_index = {r["index"]: r["score"] for r in ranked.json()["results"]}
    assert [d["score"] for d in answer["data"]] == [by_index[i] for i in range(len(DOCUMENTS))]


def test_vllm_score_pairs_and_errors(server: str) -> None:
    pairs = {"text_1": [QUERY, "bananas"], "text_2": [DOCUMENTS[1], DOCUMENTS[3]]}
    answer = httpx.post(f"{server}/score", json=pairs).json()
    expected = [
        KeywordRunner().score(QUERY, [DOCUMENTS[1]])[0],
        KeywordRunner().score("bananas", [DOCUMENTS[3]])[0],
    ]
    assert [d["score"] for d in answer["data"]] == pytest.approx(expected)
    single = {"text_1": [QUERY], "text_2": DOCUMENTS[0]}
    assert len(httpx.post(f"{server}/score", json=single).json()["data"]) == 1
    bad = httpx.post(f"{server}/score", json={"text_1": ["a", "b"], "text_2": ["x", "y", "z"]})
    assert bad.status_code == 422 and bad.json()["field"] == "text_1"
    long = httpx.post(f"{server}/score", json={"text_1": "q", "text_2": ["a"] * 1001})
    assert long.status_code == 422 and long.json()["field"] == "text_2"
    unknown = httpx.post(f"{server}/score", json={"model": "gpt-4", "text_1": "q", "text_2": "a"})
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "model_not_found"
