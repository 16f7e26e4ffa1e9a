"""Haystack pipelines against the server, over a real socket: InMemoryBM25Retriever -> ranker, with
cohere-haystack's CohereRanker (api_base_url = the server, Cohere v2 route) and
huggingface-api-haystack's HuggingFaceTEIRanker (url = the server, TEI body on /rerank). The
ranked documents must come back in the server's order (BEST_FIRST) with its scores; the route and
body each ranker sent are recorded server-side. Nothing may leave loopback."""

from __future__ import annotations

import asyncio
import math
import os

# Haystack's telemetry (a network call) is decided when haystack is first imported.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"

from collections.abc import Callable, Iterator
from typing import Any

import cohere
import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import Secret
from haystack_integrations.components.rankers.cohere import CohereRanker
from haystack_integrations.components.rankers.huggingface_api import (
    HuggingFaceTEIRanker,
    TruncationDirection,
)

from .client_harness import Recorder, loopback_only
from .conftest import running
from .fakes import KeywordRunner
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

KEY = "test-key-123"
SCORES = dict(zip(DOCUMENTS, KeywordRunner().score(QUERY, DOCUMENTS), strict=True))
TOP_K = 3


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder(keyword_app(api_key=KEY))
    with running(recorder) as url:
        yield url, recorder


@pytest.fixture
def server(served: tuple[str, Recorder]) -> Iterator[tuple[str, Recorder]]:
    url, recorder = served
    recorder.clear()
    with loopback_only() as attempts:
        yield url, recorder
    assert attempts == [], f"haystack reached for {attempts}"


def rag_pipeline(ranker: Any) -> Pipeline:
    store = InMemoryDocumentStore()
    store.write_documents([Document(content=text) for text in DOCUMENTS])
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=10))
    pipeline.add_component("ranker", ranker)
    pipeline.connect("retriever.documents", "ranker.documents")
    return pipeline


def run(pipeline: Pipeline) -> list[Document]:
    data = {"retriever": {"query": QUERY}, "ranker": {"query": QUERY}}
    return list(pipeline.run(data)["ranker"]["documents"])


def check_ranked(documents: list[Document], sent_texts: list[str], top_k: int) -> None:
    # BM25 keeps only documents sharing a word with the query: the server ranks what it was sent.
    # (BM25's order happens to be BEST_FIRST too; the scores show the server's answer is used.)
    expected = [DOCUMENTS[i] for i in BEST_FIRST if DOCUMENTS[i] in sent_texts][:top_k]
    assert len(expected) == top_k
    assert [d.content for d in documents] == expected
    assert [d.score for d in documents] == pytest.approx([SCORES[t] for t in expected])


@pytest.fixture
def cohere_ranker(served: tuple[str, Recorder]) -> Iterator[Callable[..., CohereRanker]]:
    """Makes CohereRankers pointed at the server; closes their clients afterwards, which
    cohere-haystack never does (the sockets would leak into a later test as warnings)."""
    made: list[CohereRanker] = []

    def make(**kwargs: Any) -> CohereRanker:
        ranker = CohereRanker(
            **{"api_base_url": served[0], "api_key": Secret.from_token(KEY), **kwargs}
        )
        made.append(ranker)
        return ranker

    yield make
    for ranker in made:
        if ranker._cohere_client is not None:
            ranker._cohere_client.__exit__(None, None, None)


def test_cohere_ranker_in_a_pipeline(
    server: tuple[str, Recorder], cohere_ranker: Callable[..., CohereRanker]
) -> None:
    _, recorder = server
    documents = run(rag_pipeline(cohere_ranker(top_k=TOP_K)))
    sent = recorder.only()
    assert (sent.method, sent.path, sent.status) == ("POST", "/v2/rerank", 200)
    assert sent.authorization == f"Bearer {KEY}"
    assert {k: sent.body[k] for k in ("model", "query", "top_n", "max_tokens_per_doc")} == {
        "model": "rerank-v3.5",
        "query": QUERY,
        "top_n": TOP_K,
        "max_tokens_per_doc": 4096,
    }
    check_ranked(documents, sent.body["documents"], TOP_K)


def test_cohere_ranker_top_k_at_run_time_and_meta_fields(
    server: tuple[str, Recorder], cohere_ranker: Callable[..., CohereRanker]
) -> None:
    _, recorder = server
    ranker = cohere_ranker(top_k=TOP_K, meta_fields_to_embed=["source"])
    store_documents = [Document(content=t, meta={"source": "atlas"}) for t in DOCUMENTS]
    documents = ranker.run(query=QUERY, documents=store_documents, top_k=1)["documents"]
    sent = recorder.only()
    assert sent.body["top_n"] == 1
    assert sent.body["documents"] == [f"atlas\n{t}" for t in DOCUMENTS]  # meta, separator, text
    assert [d.content for d in documents] == [DOCUMENTS[BEST_FIRST[0]]]
    assert documents[0].meta == {"source": "atlas"}


def test_cohere_ranker_in_an_async_pipeline(
    server: tuple[str, Recorder], cohere_ranker: Callable[..., CohereRanker]
) -> None:
    _, recorder = server
    ranker = cohere_ranker(top_k=TOP_K)
    pipeline = rag_pipeline(ranker)
    data = {"retriever": {"query": QUERY}, "ranker": {"query": QUERY}}

    async def run_and_close() -> list[Document]:
        result = await pipeline.run_async(data)
        # cohere-haystack never closes its async client; close it before asyncio.run's loop ends
        assert ranker._cohere_async_client is not None
        await ranker._cohere_async_client.__aexit__(None, None, None)
        return list(result["ranker"]["documents"])

    documents = asyncio.run(run_and_close())
    sent = recorder.only()
    assert (sent.path, sent.status) == ("/v2/rerank", 200)
    check_ranked(documents, sent.body["documents"], TOP_K)


def test_cohere_ranker_with_a_wrong_key_fails_loudly(
    server: tuple[str, Recorder], cohere_ranker: Callable[..., CohereRanker]
) -> None:
    _, recorder = server
    ranker = cohere_ranker(api_key=Secret.from_token("wrong"))
    with pytest.raises(cohere.UnauthorizedError):
        ranker.run(query=QUERY, documents=[Document(content=t) for t in DOCUMENTS])
    assert recorder.only().status == 401


def tei_ranker(url: str, **kwargs: Any) -> HuggingFaceTEIRanker:
    return HuggingFaceTEIRanker(url=url, token=Secret.from_token(KEY), **kwargs)


def test_tei_ranker_in_a_pipeline(server: tuple[str, Recorder]) -> None:
    url, recorder = server
    documents = run(rag_pipeline(tei_ranker(url, top_k=TOP_K)))
    sent = recorder.only()
    assert (sent.method, sent.path, sent.status) == ("POST", "/rerank", 200)
    assert sent.authorization == f"Bearer {KEY}"
    # TEI's body: every text comes back and the ranker keeps its top_k itself
    assert set(sent.body) == {"query", "texts", "raw_scores"}
    assert (sent.body["query"], sent.body["raw_scores"]) == (QUERY, False)
    check_ranked(documents, sent.body["texts"], TOP_K)


def test_tei_ranker_raw_scores_and_truncation(server: tuple[str, Recorder]) -> None:
    url, recorder = server
    ranker = tei_ranker(url, top_k=len(DOCUMENTS), raw_scores=True)
    documents = ranker.run(
        query=QUERY,
        documents=[Document(content=t) for t in DOCUMENTS],
        truncation_direction=TruncationDirection.LEFT,
    )["documents"]
    sent = recorder.only()
    assert sent.status == 200
    assert {k: sent.body[k] for k in ("raw_scores", "truncate", "truncation_direction")} == {
        "raw_scores": True,
        "truncate": True,
        "truncation_direction": "Left",
    }
    assert [d.content for d in documents] == [DOCUMENTS[i] for i in BEST_FIRST]
    logits = [math.log(SCORES[d.content] / (1 - SCORES[d.content])) for d in documents]
    assert [d.score for d in documents] == pytest.approx(logits)


def test_tei_ranker_in_an_async_pipeline(server: tuple[str, Recorder]) -> None:
    url, recorder = server
    pipeline = rag_pipeline(tei_ranker(url, top_k=TOP_K))
    data = {"retriever": {"query": QUERY}, "ranker": {"query": QUERY}}
    documents = asyncio.run(pipeline.run_async(data))["ranker"]["documents"]
    sent = recorder.only()
    assert (sent.path, sent.status) == ("/rerank", 200)
    check_ranked(documents, sent.body["texts"], TOP_K)
