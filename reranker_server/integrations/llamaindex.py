"""A LlamaIndex node postprocessor that reranks nodes through reranker-server.

    from reranker_server.integrations.llamaindex import RerankerServerRerank

    query_engine = index.as_query_engine(
        similarity_top_k=20,
        node_postprocessors=[RerankerServerRerank(base_url="http://localhost:5200", top_n=5)],
    )

The answer is the nodes best first, as new `NodeWithScore`s whose `score` is the server's
(as `llama_index.postprocessor.cohere_rerank.CohereRerank` does). Errors from the server raise
`reranker_server.client.RerankerClientError` subclasses. Each call opens its own HTTP client:
nothing to close, and an async client's connections belong to one event loop.
"""

from __future__ import annotations

from typing import Any

from ..client import (
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT_S,
    AsyncRerankerClient,
    Ranking,
    RerankerClient,
)
from ._imports import missing_extra

try:
    from llama_index.core.bridge.pydantic import Field, SecretStr
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("llama-index-core", "llamaindex") from exc

__all__ = ["RerankerServerRerank"]


class RerankerServerRerank(BaseNodePostprocessor):
    """Reranks nodes through reranker-server; keeps the best `top_n` (all when None)."""

    base_url: str = Field(default=DEFAULT_BASE_URL, description="The server's base URL.")
    api_key: SecretStr | None = Field(default=None, description="The server's API key, if any.")
    top_n: int | None = Field(default=2, ge=1, description="How many nodes to keep.")
    model: str | None = Field(default=None, description="A model name, if the server checks it.")
    timeout: float = Field(default=DEFAULT_TIMEOUT_S, description="Seconds per request.")

    @classmethod
    def class_name(cls) -> str:
        return "RerankerServerRerank"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = _query_of(query_bundle)
        if not nodes:
            return []
        payload = self._payload(nodes, query)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            with RerankerClient(self.base_url, **self._client_options()) as client:
                ranking = client.rerank(query, _texts(nodes), self.top_n, model=self.model)
            reranked = _scored(nodes, ranking)
            event.on_end(payload={EventPayload.NODES: reranked})
        return reranked

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = _query_of(query_bundle)
        if not nodes:
            return []
        payload = self._payload(nodes, query)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            async with AsyncRerankerClient(self.base_url, **self._client_options()) as client:
                ranking = await client.rerank(query, _texts(nodes), self.top_n, model=self.model)
            reranked = _scored(nodes, ranking)
            event.on_end(payload={EventPayload.NODES: reranked})
        return reranked

    def _client_options(self) -> dict[str, Any]:
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return {"api_key": key, "timeout": self.timeout}

    def _payload(self, nodes: list[NodeWithScore], query: str) -> dict[str, Any]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self.model or "reranker-server",
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self.top_n,
        }


def _query_of(query_bundle: QueryBundle | None) -> str:
    if query_bundle is None:
        raise ValueError("RerankerServerRerank needs the query: pass query_str or query_bundle")
    return query_bundle.query_str


def _texts(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]


def _scored(nodes: list[NodeWithScore], ranking: Ranking) -> list[NodeWithScore]:
    return [NodeWithScore(node=nodes[r.index].node, score=r.score) for r in ranking.results]
