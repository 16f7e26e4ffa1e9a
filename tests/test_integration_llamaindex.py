"""The LlamaIndex node postprocessor, end to end: a real query engine (vector index over
LlamaIndex's mock embedding -> retrieve -> our postprocessor -> response synthesis with LlamaIndex's
offline MockLLM, which echoes its prompt) against uvicorn on 127.0.0.1. The nodes, and the context
the LLM is given, must be in the server's order, with the server's scores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.schema import NodeWithScore, TextNode

from reranker_server.app import create_app
from reranker_server.client import ConnectionFailed, RerankerClient
from reranker_server.integrations.llamaindex import RerankerServerRerank
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings

from .conftest import free_port, running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

BEST_TEXTS = [DOCUMENTS[i] for i in BEST_FIRST]


@pytest.fixture(scope="module")
def keyword_url() -> Iterator[str]:
    with running(keyword_app()) as url:
        yield url


def query_engine(url: str, top_n: int) -> BaseQueryEngine:
    nodes = [TextNode(text=t, id_=str(i)) for i, t in enumerate(DOCUMENTS)]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    return index.as_query_engine(
        llm=MockLLM(),  # echoes the prompt: the response shows the context the LLM was given
        similarity_top_k=len(DOCUMENTS),
        node_postprocessors=[RerankerServerRerank(base_url=url, top_n=top_n)],
    )


def server_scores(url: str, texts: list[str]) -> list[float]:
    with RerankerClient(url) as client:
        return [r.score for r in client.rerank(QUERY, texts).results]


def assert_context_order(prompt: str, texts: list[str]) -> None:
    positions = [prompt.index(t) for t in texts]
    assert positions == sorted(positions), prompt
    assert not any(t in prompt for t in DOCUMENTS if t not in texts), prompt


def test_query_engine_postprocessor_step_gives_the_servers_order(keyword_url: str) -> None:
    response = query_engine(keyword_url, top_n=3).query(QUERY)

    assert [n.node.get_content() for n in response.source_nodes] == BEST_TEXTS[:3]
    assert [n.score for n in response.source_nodes] == server_scores(keyword_url, BEST_TEXTS)[:3]
    assert_context_order(str(response), BEST_TEXTS[:3])


def test_async_query_engine_gives_the_same(keyword_url: str) -> None:
    response = asyncio.run(query_engine(keyword_url, top_n=2).aquery(QUERY))
    assert [n.node.node_id for n in response.source_nodes] == [str(i) for i in BEST_FIRST[:2]]
    assert [n.score for n in response.source_nodes] == server_scores(keyword_url, BEST_TEXTS)[:2]
    assert_context_order(str(response), BEST_TEXTS[:2])


def test_postprocessor_with_the_generated_models(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path / "cache",
        offline=True,
        device="cpu",
        cpu_threads=1,
        stage2_on_cpu=True,
    )
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.5) for t in DOCUMENTS]
    with running(create_app(settings)) as url:
        reranker = RerankerServerRerank(base_url=url, top_n=3)
        found = reranker.postprocess_nodes(nodes, query_str=QUERY)
        found_async = asyncio.run(reranker.apostprocess_nodes(nodes, query_str=QUERY))
        with RerankerClient(url) as client:
            expected = client.rerank(QUERY, DOCUMENTS, top_k=3)
    for answer in (found, found_async):
        assert [n.node.get_content() for n in answer] == [r.text for r in expected.results]
        assert [n.score for n in answer] == [r.score for r in expected.results]
    assert all(n.score == 0.5 for n in nodes)  # the input is unchanged


def test_errors_raise_and_a_query_is_required(keyword_url: str) -> None:
    nodes = [NodeWithScore(node=TextNode(text="x"))]
    down = RerankerServerRerank(base_url=f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(ConnectionFailed):
        down.postprocess_nodes(nodes, query_str=QUERY)
    assert down.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValueError, match="query"):
        RerankerServerRerank(base_url=keyword_url).postprocess_nodes(nodes)
