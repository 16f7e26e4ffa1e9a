"""The LangChain document compressor, end to end: the real `ContextualCompressionRetriever` over
LangChain's in-memory vector store, against uvicorn on 127.0.0.1. The documents must come back in
the server's order, as copies carrying the server's scores in `metadata["relevance_score"]`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

from reranker_server.app import create_app
from reranker_server.client import ConnectionFailed, RerankerClient, Unauthorized
from reranker_server.integrations.langchain import RerankerServerCompressor
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings

from .conftest import free_port, running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

BEST_TEXTS = [DOCUMENTS[i] for i in BEST_FIRST]


@pytest.fixture(scope="module")
def keyword_url() -> Iterator[str]:
    with running(keyword_app()) as url:
        yield url


@pytest.fixture(scope="module")
def store() -> InMemoryVectorStore:
    """LangChain's in-memory vector store; its hashing embedding ignores meaning."""
    vectors = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    vectors.add_documents(
        [Document(page_content=t, metadata={"n": i}) for i, t in enumerate(DOCUMENTS)]
    )
    return vectors


def retriever(store: InMemoryVectorStore, **options: object) -> ContextualCompressionRetriever:
    return ContextualCompressionRetriever(
        base_compressor=RerankerServerCompressor(**options),
        base_retriever=store.as_retriever(search_kwargs={"k": len(DOCUMENTS)}),
    )


def server_scores(url: str, texts: list[str]) -> list[float]:
    with RerankerClient(url) as client:
        return [r.score for r in client.rerank(QUERY, texts).results]


def test_retriever_returns_the_servers_order_with_relevance_scores(
    keyword_url: str, store: InMemoryVectorStore
) -> None:
    found = retriever(store, base_url=keyword_url, top_n=3).invoke(QUERY)

    assert [d.page_content for d in found] == BEST_TEXTS[:3]
    scores = server_scores(keyword_url, BEST_TEXTS)
    assert [d.metadata["relevance_score"] for d in found] == scores[:3]
    assert [d.metadata["n"] for d in found] == BEST_FIRST[:3]  # the caller's metadata is kept
    # Copies: what the store holds is unchanged.
    assert all("relevance_score" not in entry["metadata"] for entry in store.store.values())


def test_async_retriever_returns_the_same(keyword_url: str, store: InMemoryVectorStore) -> None:
    found = asyncio.run(retriever(store, base_url=keyword_url, top_n=None).ainvoke(QUERY))
    assert [d.page_content for d in found] == BEST_TEXTS
    assert [d.metadata["relevance_score"] for d in found] == server_scores(keyword_url, BEST_TEXTS)


def test_compressor_with_the_generated_models(tiny_models: TestModelPaths, tmp_path: Path) -> None:
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path / "cache",
        offline=True,
        device="cpu",
        cpu_threads=1,
        stage2_on_cpu=True,
    )
    docs = [Document(page_content=t) for t in DOCUMENTS]
    with running(create_app(settings)) as url:
        compressor = RerankerServerCompressor(base_url=url, top_n=3)
        found = compressor.compress_documents(docs, QUERY)
        found_async = asyncio.run(compressor.acompress_documents(docs, QUERY))
        with RerankerClient(url) as client:
            expected = client.rerank(QUERY, DOCUMENTS, top_k=3)
    for answer in (found, found_async):
        assert [d.page_content for d in answer] == [r.text for r in expected.results]
        scores = [d.metadata["relevance_score"] for d in answer]
        assert scores == [r.score for r in expected.results]


def test_api_key_is_sent() -> None:
    docs = [Document(page_content=t) for t in DOCUMENTS]
    with running(keyword_app(api_key="s3cret")) as url:
        found = RerankerServerCompressor(base_url=url, api_key="s3cret").compress_documents(
            docs, QUERY
        )
        assert [d.page_content for d in found] == BEST_TEXTS[:3]
        with pytest.raises(Unauthorized):
            RerankerServerCompressor(base_url=url).compress_documents(docs, QUERY)


def test_errors_raise_and_empty_input_needs_no_server() -> None:
    down = RerankerServerCompressor(base_url=f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(ConnectionFailed):
        down.compress_documents([Document(page_content="x")], QUERY)
    assert down.compress_documents([], QUERY) == []
    assert asyncio.run(down.acompress_documents([], QUERY)) == []
