"""A mem0 reranker provider that reranks memories through reranker-server.

    import reranker_server.integrations.mem0  # registers the provider "reranker_server"
    from mem0 import Memory

    memory = Memory.from_config({
        ...,
        "reranker": {
            "provider": "reranker_server",
            "config": {"base_url": "http://localhost:5200", "api_key": None, "top_k": 5},
        },
    })
    memory.search("...", filters={"user_id": "alice"}, rerank=True)

mem0 catches every `Exception` a reranker raises and quietly keeps the vector-search order. This
provider makes a failure visible: it logs an ERROR naming the server and the cause, then returns the
memories in their original order (as mem0's own providers do). With `raise_on_error: True` it raises
`RerankFailed` instead, which derives from `BaseException` precisely so that it passes mem0's
`except Exception` and reaches the caller of `Memory.search`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict

from ..client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT_S, RerankerClient
from ._imports import missing_extra

try:
    from mem0.configs.rerankers.base import BaseRerankerConfig
    from mem0.utils.factory import RerankerFactory
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("mem0ai", "mem0") from exc

logger = logging.getLogger(__name__)

PROVIDER = "reranker_server"

__all__ = ["PROVIDER", "RerankFailed", "RerankerServerConfig", "RerankerServerReranker", "register"]


class RerankerServerConfig(BaseRerankerConfig):
    """The provider's `config` block. Unknown keys are rejected (a typo must not pass silently).

    `top_k`: at most this many memories (mem0 also passes `search`'s `top_k`; the smaller wins).
    `model`: a model name, for servers that check it (`RERANKER_ACCEPTED_MODELS`).
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    timeout: float = DEFAULT_TIMEOUT_S
    raise_on_error: bool = False


class RerankFailed(BaseException):
    """The server could not rerank (raised only with `raise_on_error`); `__cause__` says why.

    A `BaseException`, not an `Exception`: mem0's `Memory.search` swallows `Exception`s from a
    reranker. Catch it by name: `except RerankFailed`.
    """


class RerankerServerReranker:
    """mem0's reranker interface over reranker-server: copies of the memories with `rerank_score`.

    It implements `mem0.reranker.base.BaseReranker` without inheriting from it: importing
    `mem0.reranker` imports all of mem0's rerankers, and with them torch and
    sentence-transformers. mem0 only calls `rerank`; it never checks the class.
    """

    def __init__(self, config: RerankerServerConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = RerankerServerConfig()
        elif not isinstance(config, RerankerServerConfig):
            config = RerankerServerConfig(**dict(config))
        self.config = config

    def rerank(
        self, query: str, documents: list[dict[str, Any]], top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The memories best first, each a copy with `rerank_score`; at most `top_k` of them."""
        if not documents:
            return []
        limit = _smaller(top_k, self.config.top_k)
        texts = [_text_of(doc) for doc in documents]
        try:
            # A client per call: mem0 never closes a reranker, so nothing may stay open.
            with RerankerClient(
                self.config.base_url, api_key=self.config.api_key, timeout=self.config.timeout
            ) as client:
                ranking = client.rerank(query, texts, top_k=limit, model=self.config.model)
        except Exception as exc:  # any failure: mem0 would swallow it, so say it here
            return self._failed(exc, documents, limit)
        return [{**documents[r.index], "rerank_score": r.score} for r in ranking.results]

    def _failed(
        self, exc: Exception, documents: list[dict[str, Any]], limit: int | None
    ) -> list[dict[str, Any]]:
        message = (
            f"reranker-server at {self.config.base_url} failed to rerank "
            f"{len(documents)} memories: {type(exc).__name__}: {exc}"
        )
        if self.config.raise_on_error:
            raise RerankFailed(message) from exc
        logger.error("%s; keeping the vector-search order", message)
        return [{**doc, "rerank_score": 0.0} for doc in documents[:limit]]


def register(name: str = PROVIDER) -> None:
    """Make `name` a reranker provider in mem0's `RerankerFactory` (done once on import)."""
    RerankerFactory.provider_to_class[name] = (
        f"{__name__}.{RerankerServerReranker.__name__}",
        RerankerServerConfig,
    )


def _smaller(a: int | None, b: int | None) -> int | None:
    given = [n for n in (a, b) if n]
    return min(given) if given else None


def _text_of(doc: Mapping[str, Any]) -> str:
    """The text mem0 keeps under `memory` (other stores: `text`, `content`)."""
    for key in ("memory", "text", "content"):
        if key in doc:
            return str(doc[key])
    return str(doc)


register()
