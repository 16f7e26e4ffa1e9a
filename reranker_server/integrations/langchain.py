"""A LangChain document compressor that reranks `Document`s through reranker-server.

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from reranker_server.integrations.langchain import RerankerServerCompressor

    retriever = ContextualCompressionRetriever(
        base_compressor=RerankerServerCompressor(base_url="http://localhost:5200", top_n=5),
        base_retriever=vector_store.as_retriever(search_kwargs={"k": 20}),
    )

The answer is copies of the documents, best first, each with `metadata["relevance_score"]`
(LangChain's convention, as in `langchain_cohere.CohereRerank`); the inputs are not changed.
Errors from the server raise `reranker_server.client.RerankerClientError` subclasses. Each call
opens its own HTTP client: nothing to close, and an async client's connections belong to one
event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ConfigDict, Field, SecretStr

from ..client import (
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT_S,
    AsyncRerankerClient,
    Ranking,
    RerankerClient,
)
from ._imports import missing_extra

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("langchain-core", "langchain") from exc

__all__ = ["RerankerServerCompressor"]


class RerankerServerCompressor(BaseDocumentCompressor):
    """Reranks documents through reranker-server; keeps the best `top_n` (all when None)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = None
    top_n: int | None = Field(default=3, ge=1)
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """The best `top_n` documents, best first, as scored copies."""
        if not documents:
            return []
        with RerankerClient(self.base_url, **self._client_options()) as client:
            ranking = client.rerank(query, _texts(documents), self.top_n, model=self.model)
        return _scored(documents, ranking)

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """`compress_documents` without blocking the event loop."""
        if not documents:
            return []
        async with AsyncRerankerClient(self.base_url, **self._client_options()) as client:
            ranking = await client.rerank(query, _texts(documents), self.top_n, model=self.model)
        return _scored(documents, ranking)

    def _client_options(self) -> dict[str, Any]:
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return {"api_key": key, "timeout": self.timeout}


def _texts(documents: Sequence[Document]) -> list[str]:
    return [doc.page_content for doc in documents]


def _scored(documents: Sequence[Document], ranking: Ranking) -> list[Document]:
    return [
        documents[r.index].model_copy(
            update={"metadata": {**documents[r.index].metadata, "relevance_score": r.score}}
        )
        for r in ranking.results
    ]
