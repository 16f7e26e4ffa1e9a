"""Every dialect end to end: the real client packages (cohere SDK v1 and v2, langchain-cohere,
llama-index's Cohere reranker) and raw HTTP in TEI's and Jina-style shapes, against uvicorn on
127.0.0.1 serving the generated tiny models through both stages. Each answer must equal the native
endpoint's for the same input: the same documents, in the same order, with the same scores."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import pytest
from langchain_cohere import CohereRerank as LangChainCohereRerank
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank

from reranker_server.app import create_app
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings

from .conftest import running

QUERY = "how do plants turn sunlight into energy"
DOCUMENTS = [
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The stock market fell sharply on Tuesday.",
    "Chlorophyll absorbs sunlight in the leaves of green plants.",
    "A recipe for banana bread with walnuts.",
    "Solar panels turn sunlight into electricity.",
    "Plants store energy as glucose and starch.",
    "The history of the Roman empire in ten minutes.",
    "Mitochondria release energy from food in animal cells.",
]
CANDIDATES = 4  # fewer than the documents, so top_n changes what stage 2 sees


@pytest.fixture(scope="module")
def server(tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        offline=True,
        device="cpu",
        cpu_threads=1,
        stage2_on_cpu=True,
        candidates=CANDIDATES,
    )
    with running(create_app(settings)) as url:
        yield url


def native(server: str, top_k: int, **extra: Any) -> list[tuple[int, float]]:
    """(index, score) best first from the native dialect."""
    body = {"query": QUERY, "documents": DOCUMENTS, "top_k": top_k, **extra}
    response = httpx.post(f"{server}/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert [s["name"] for s in data["stages"]][-1] == data["model"]
    assert len(data["stages"]) == 2  # both stages ran: the comparison covers the cascade
    return [(r["index"], r["score"]) for r in data["results"]]


def assert_best_first(pairs: list[tuple[int, float]]) -> None:
    scores = [s for _, s in pairs]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_native_answer_is_ordered_and_distinct(server: str) -> None:
    pairs = native(server, len(DOCUMENTS))
    assert sorted(i for i, _ in pairs) == list(range(len(DOCUMENTS)))
    assert_best_first(pairs)
    assert len({s for _, s in pairs}) > 1  # the models tell documents apart


def test_cohere_v1_client(server: str) -> None:
    with cohere.Client(api_key="any-key", base_url=server) as co:
        response = co.rerank(
            query=QUERY,
            documents=DOCUMENTS,
            top_n=3,
            return_documents=True,
            model="rerank-english-v3.0",
        )
    got = [(r.index, r.relevance_score) for r in response.results]
    assert got == native(server, 3)
    for r in response.results:
        assert r.document is not None and r.document.text == DOCUMENTS[r.index]
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "1"
    assert response.id


def test_cohere_v1_client_object_documents_with_rank_fields(server: str) -> None:
    docs = [{"title": f"doc {i}", "text": text} for i, text in enumerate(DOCUMENTS)]
    with cohere.Client(api_key="any-key", base_url=server) as co:
        response = co.rerank(
            query=QUERY,
            documents=docs,
            rank_fields=["title", "text"],
            top_n=5,
            return_documents=True,
        )
    got = [(r.index, r.relevance_score) for r in response.results]
    # The text ranked is one "key: value" line per field: the native dialect with those strings.
    as_text = [f"title: {d['title']}\ntext: {d['text']}" for d in docs]
    body = {"query": QUERY, "documents": as_text, "top_k": 5}
    data = httpx.post(f"{server}/rerank", json=body, timeout=60).json()
    assert got == [(r["index"], r["score"]) for r in data["results"]]
    assert got != native(server, 5)  # the titles changed the input, so the scores differ
    assert response.results[0].document is not None
    assert response.results[0].document.dict()["title"] == docs[response.results[0].index]["title"]


def test_cohere_v2_client(server: str) -> None:
    with cohere.ClientV2(api_key="any-key", base_url=server) as co:
        response = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=2)
        assert [(r.index, r.relevance_score) for r in response.results] == native(server, 2)
        # No top_n: every document.
        response = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    got = [(r.index, r.relevance_score) for r in response.results]
    assert got == native(server, len(DOCUMENTS))
    assert_best_first(got)


def test_cohere_async_v2_client(server: str) -> None:
    async def call() -> list[tuple[int, float]]:
        async with cohere.AsyncClientV2(api_key="any-key", base_url=server) as co:
            response = await co.rerank(
                model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=3
            )
        return [(r.index, r.relevance_score) for r in response.results]

    assert asyncio.run(call()) == native(server, 3)


def test_langchain_cohere_rerank(server: str) -> None:
    reranker = LangChainCohereRerank(
        base_url=server, cohere_api_key="any-key", model="rerank-v3.5", top_n=3
    )
    docs = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(DOCUMENTS)]
    with reranker.client:  # the cohere ClientV2 it built from base_url; closes its connections
        compressed = reranker.compress_documents(docs, QUERY)
    expected = native(server, 3)
    assert [d.metadata["n"] for d in compressed] == [i for i, _ in expected]
    assert [d.metadata["relevance_score"] for d in compressed] == [s for _, s in expected]


def test_llama_index_cohere_rerank(server: str) -> None:
    reranker = LlamaIndexCohereRerank(
        top_n=3, model="rerank-v3.5", api_key="any-key", base_url=server, max_retries=1
    )
    nodes = [
        NodeWithScore(node=TextNode(text=text, id_=str(i))) for i, text in enumerate(DOCUMENTS)
    ]
    with reranker._client:  # the cohere ClientV2 it built from base_url; closes its connections
        ranked = reranker.postprocess_nodes(nodes, query_str=QUERY)
    expected = native(server, 3)
    assert [int(n.node.node_id) for n in ranked] == [i for i, _ in expected]
    assert [n.score for n in ranked] == [s for _, s in expected]


def test_tei_shape_returns_every_text_best_first(server: str) -> None:
    body = {"query": QUERY, "texts": DOCUMENTS, "return_text": True, "truncate": True}
    response = httpx.post(f"{server}/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, list)
    assert [(r["index"], r["score"]) for r in data] == native(server, len(DOCUMENTS))
    assert all(r["text"] == DOCUMENTS[r["index"]] for r in data)


def test_tei_raw_scores_are_logits(server: str) -> None:
    body = {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}
    data = httpx.post(f"{server}/rerank", json=body, timeout=60).json()
    expected = native(server, len(DOCUMENTS))
    assert [r["index"] for r in data] == [i for i, _ in expected]
    for r, (_, p) in zip(data, expected, strict=True):
        assert r["score"] == pytest.approx(math.log(p / (1 - p)), rel=1e-9, abs=1e-9)
        assert "text" not in r
    assert any(r["score"] < 0 or r["score"] > 1 for r in data)  # logits, not probabilities


# Bodies as Jina-style clients send them (Open WebUI "external", Dify, RAGFlow, Jina's own API):
# (path, body, how many results).
N = len(DOCUMENTS)
CLIENT_SHAPES = {
    "open-webui": ("/v1/rerank", {"model": "bge-reranker", "query": QUERY, "top_n": 3}, 3),
    "dify": (
        "/rerank",
        {"model": "x", "query": QUERY, "top_n": None, "return_documents": "true"},
        N,
    ),
    "dify-score-threshold": (
        "/v1/rerank",
        {"model": "x", "query": QUERY, "top_n": 4, "score_threshold": 0.99, "user": "u1"},
        4,
    ),
    "ragflow": ("/v1/rerank", {"model": "x", "query": QUERY, "top_n": N}, N),
    "ragflow-native-path": ("/rerank", {"model": "x", "query": QUERY, "top_n": N}, N),
    "jina": (
        "/v1/rerank",
        {"model": "jina-reranker-v2", "query": QUERY, "top_n": 3, "return_documents": True},
        3,
    ),
    "top-n-zero": ("/v2/rerank", {"model": "x", "query": QUERY, "top_n": 0}, N),
    "top-n-too-large": ("/v1/rerank", {"query": QUERY, "top_n": 100}, N),
    "top-n-as-string": ("/v1/rerank", {"query": QUERY, "top_n": "2"}, 2),
    "all-nulls": (
        "/v1/rerank",
        {
            "query": QUERY,
            "model": None,
            "top_n": None,
            "rank_fields": None,
            "return_documents": None,
            "max_chunks_per_doc": None,
            "max_tokens_per_doc": None,
            "priority": None,
        },
        N,
    ),
}


@pytest.mark.parametrize("shape", sorted(CLIENT_SHAPES))
def test_jina_style_bodies(server: str, shape: str) -> None:
    path, extra, count = CLIENT_SHAPES[shape]
    body = {"documents": DOCUMENTS, **extra}
    response = httpx.post(
        f"{server}{path}", json=body, headers={"Authorization": "Bearer sk-anything"}, timeout=60
    )
    assert response.status_code == 200, response.text
    data = response.json()
    got = [(r["index"], r["relevance_score"]) for r in data["results"]]
    assert got == native(server, count)
    assert data["model"] and data["usage"]["documents"] == N
    wants_documents = str(extra.get("return_documents")).lower() == "true"
    for r in data["results"]:
        if wants_documents:
            assert r["document"] == {"text": DOCUMENTS[r["index"]]}
        else:
            assert "document" not in r


def test_object_documents_on_jina_path(server: str) -> None:
    docs = [{"text": text, "id": f"d{i}", "meta": {"page": i}} for i, text in enumerate(DOCUMENTS)]
    body = {"query": QUERY, "documents": docs, "top_n": 3, "return_documents": "True"}
    data = httpx.post(f"{server}/v1/rerank", json=body, timeout=60).json()
    assert [(r["index"], r["relevance_score"]) for r in data["results"]] == native(server, 3)
    assert [r["document"] for r in data["results"]] == [docs[r["index"]] for r in data["results"]]


def test_openapi_shows_every_dialect(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    paths = spec["paths"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/rerank/batch"):
        assert "post" in paths[path], path
    body_schema = paths["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[-1] for item in body_schema["oneOf"]}
    assert refs == {"RerankRequest", "TeiRerankRequest"}
    answer = paths["/rerank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"type": "array", "items": {"$ref": "#/components/schemas/TeiRank"}} in answer["anyOf"]
    schemas = spec["components"]["schemas"]
    assert {"top_n", "rank_fields", "return_documents", "model"} <= set(
        schemas["CohereRerankRequest"]["properties"]
    )
    assert "401" in paths["/v2/rerank"]["post"]["responses"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
