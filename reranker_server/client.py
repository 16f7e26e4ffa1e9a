"""A Python client for reranker-server, on httpx: `RerankerClient` and `AsyncRerankerClient`.

    from reranker_server.client import RerankerClient

    with RerankerClient("http://localhost:5200", api_key=None) as client:
        ranking = client.rerank("capital of France?", ["Berlin ...", "Paris ..."], top_k=1)
        best = ranking.results[0]          # ScoredDocument(index=1, text="Paris ...", score=0.98)

It imports neither fastapi nor torch (only httpx and the package's value types), so it is cheap in
any application. Error answers raise `RerankerClientError` subclasses chosen by the server's
`error_type` (`InvalidRequest`, `Unauthorized`, `Overloaded`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from .errors import RerankerError
from .types import ScoredDocument, StageReport

DEFAULT_BASE_URL = "http://localhost:5200"
DEFAULT_TIMEOUT_S = 130.0  # above the server's default request timeout (120 s)

__all__ = [
    "AsyncRerankerClient",
    "ConnectionFailed",
    "InvalidRequest",
    "ModelNotFound",
    "NotReady",
    "Overloaded",
    "Ranking",
    "RerankQuery",
    "RerankerClient",
    "RerankerClientError",
    "ServerError",
    "ServerTimeout",
    "StageOneRank",
    "Unauthorized",
]


# --- results


@dataclass(frozen=True)
class StageOneRank:
    """Where stage 1 put a result: its rank in stage 1's order of the whole request (1 = stage
    1's best) and its stage-1 score."""

    rank: int
    score: float


@dataclass(frozen=True)
class Ranking:
    """One query's answer: results best first, and how the server produced them.

    `stage1`: with `return_stages=True`, one entry per result (same order); else None.
    """

    results: list[ScoredDocument]
    backend: str
    fallback: str | None
    model: str
    stages: list[StageReport]
    id: str
    stage1: list[StageOneRank] | None = None

    @property
    def indices(self) -> list[int]:
        """The documents' positions in the request, best first."""
        return [r.index for r in self.results]


@dataclass(frozen=True)
class RerankQuery:
    """One item of a batch. `top_k=None` returns every document."""

    query: str
    documents: Sequence[str]
    top_k: int | None = None


# --- errors


class RerankerClientError(RerankerError):
    """The server answered an error (or could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str = "client_error",
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidRequest(RerankerClientError):
    """The request broke a rule (a field, a limit, JSON, content type); `field` names it."""


class ModelNotFound(InvalidRequest):
    """The server restricts model names and does not serve the one asked for."""


class Unauthorized(RerankerClientError):
    """The server requires an API key and this one is missing or wrong."""


class Overloaded(RerankerClientError):
    """The server's queue is full; retry after `retry_after_s`."""


class ServerTimeout(RerankerClientError):
    """The request waited plus ran longer than the server's timeout; retry later."""


class NotReady(RerankerClientError):
    """The models are not loaded (yet)."""


class ServerError(RerankerClientError):
    """The server failed (500); the cause is in its log."""


class ConnectionFailed(RerankerClientError):
    """No answer: the server is down, unreachable, or the read timed out."""


ERROR_TYPES: dict[str, type[RerankerClientError]] = {
    "invalid_request": InvalidRequest,
    "invalid_json": InvalidRequest,
    "payload_too_large": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "model_not_found": ModelNotFound,
    "unauthorized": Unauthorized,
    "overloaded": Overloaded,
    "timeout": ServerTimeout,
    "not_ready": NotReady,
    "model_load_error": NotReady,
    "inference_error": ServerError,
    "internal_error": ServerError,
}


def _error_from(response: httpx.Response) -> RerankerClientError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    error_type = str(body.get("error_type") or "http_error")
    message = str(body.get("detail") or body.get("error") or response.reason_phrase)
    cls = ERROR_TYPES.get(error_type)
    if cls is None:
        cls = InvalidRequest if response.status_code < 500 else ServerError
    retry_after = response.headers.get("retry-after")
    return cls(
        f"{response.status_code} {error_type}: {message}",
        status=response.status_code,
        error_type=error_type,
        field=body.get("field"),
        retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


# --- wire format


def _rerank_body(
    query: str,
    documents: Sequence[str],
    top_k: int | None,
    model: str | None,
    candidates: int | None = None,
    return_stages: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {"query": query, "documents": list(documents)}
    if top_k is None:
        body["top_n"] = None  # all documents
    else:
        body["top_k"] = top_k
    if model is not None:
        body["model"] = model
    if candidates is not None:
        body["candidates"] = candidates
    if return_stages:
        body["return_stages"] = True
    return body


def _ranking(data: Mapping[str, Any]) -> Ranking:
    return Ranking(
        results=[
            ScoredDocument(int(r["index"]), str(r["text"]), float(r["score"]))
            for r in data["results"]
        ],
        backend=str(data["backend"]),
        fallback=data.get("fallback"),
        model=str(data.get("model", "")),
        stages=[
            StageReport(str(s["name"]), str(s["device"]), int(s["documents"]), float(s["seconds"]))
            for s in data.get("stages", [])
        ],
        id=str(data.get("id", "")),
        stage1=_stage1(data["results"]),
    )


def _stage1(results: Sequence[Mapping[str, Any]]) -> list[StageOneRank] | None:
    """The results' stage-1 ranks, when the server gave every result one."""
    if not results or any(r.get("stage1_rank") is None for r in results):
        return None
    return [StageOneRank(int(r["stage1_rank"]), float(r["stage1_score"])) for r in results]


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_from(response)
    return response.json()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# --- clients


class RerankerClient:
    """Blocking client. Use as a context manager, or call `close()`.

    `http_client`: bring your own `httpx.Client` (its base URL and headers are used as given and
    it is not closed here).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        *,
        model: str | None = None,
        candidates: int | None = None,
        return_stages: bool = False,
    ) -> Ranking:
        """The best `top_k` documents (all when None), best first. `candidates`: how many of
        stage 1's best go to stage 2 (None: the server's setting); `return_stages`: give each
        result its stage-1 score and rank."""
        data = self._post(
            "/rerank", _rerank_body(query, documents, top_k, model, candidates, return_stages)
        )
        return _ranking(data)

    def rerank_batch(self, queries: Sequence[RerankQuery]) -> list[Ranking]:
        """Several queries in one call; answers in the same order."""
        body = {"requests": [_rerank_body(q.query, q.documents, q.top_k, None) for q in queries]}
        return [_ranking(item) for item in self._post("/rerank/batch", body)["responses"]]

    def health(self) -> dict[str, Any]:
        """`GET /health`: status, models, GPU state."""
        try:
            result: dict[str, Any] = _json(self._http.get("/health"))
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        return result

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        return _json(response)

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncRerankerClient:
    """The same as `RerankerClient`, for asyncio (`async with`, `await client.rerank(...)`)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        *,
        model: str | None = None,
        candidates: int | None = None,
        return_stages: bool = False,
    ) -> Ranking:
        """The best `top_k` documents (all when None), best first. `candidates`: how many of
        stage 1's best go to stage 2 (None: the server's setting); `return_stages`: give each
        result its stage-1 score and rank."""
        data = await self._post(
            "/rerank", _rerank_body(query, documents, top_k, model, candidates, return_stages)
        )
        return _ranking(data)

    async def rerank_batch(self, queries: Sequence[RerankQuery]) -> list[Ranking]:
        """Several queries in one call; answers in the same order."""
        body = {"requests": [_rerank_body(q.query, q.documents, q.top_k, None) for q in queries]}
        data = await self._post("/rerank/batch", body)
        return [_ranking(item) for item in data["responses"]]

    async def health(self) -> dict[str, Any]:
        """`GET /health`: status, models, GPU state."""
        try:
            result: dict[str, Any] = _json(await self._http.get("/health"))
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        return result

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        return _json(response)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRerankerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
