"""The rerank routes: each reads its dialect's body, turns it into work (`to_work`: the request's
totals and jobs, which the service admits as a whole before any job runs), answers it through the
service (`answer.answer`) and shapes the outcome (`from_outcome`).

| route                          | dialect module                      |
|--------------------------------|-------------------------------------|
| `POST /rerank`                 | native.py, or tei.py for a body with `texts` |
| `POST /rerank/batch`           | native.py (batch)                   |
| `POST /v1/rerank`, `/v2/rerank` | cohere.py                          |
| `POST /score`, `/v1/score`      | vllm.py                             |
| `GET /info`                     | tei.py                              |
| `GET /v1/models`                | vllm.py                             |
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request
from pydantic import Discriminator, Tag

from .. import __version__
from . import cohere, native, tei, vllm
from .answer import answer
from .auth import API_KEY_DOCUMENTED
from .deps import ServiceDep
from .schemas import ERROR_RESPONSES, NATIVE_SHAPE, SPEC_EXAMPLE, TEI_SHAPE, RerankRequest

native_router = APIRouter(tags=["native"], dependencies=API_KEY_DOCUMENTED)
batch_router = APIRouter(tags=["batch"], dependencies=API_KEY_DOCUMENTED)
cohere_router = APIRouter(tags=["cohere"], dependencies=API_KEY_DOCUMENTED)
vllm_router = APIRouter(tags=["vllm"], dependencies=API_KEY_DOCUMENTED)
tei_router = APIRouter(tags=["tei"])
models_router = APIRouter(tags=["vllm"])  # GET: open like /health (the guard checks POSTs)


def _body_shape(body: Any) -> str:
    return TEI_SHAPE if isinstance(body, dict) and "texts" in body else NATIVE_SHAPE


RerankBody = Annotated[
    Annotated[RerankRequest, Tag(NATIVE_SHAPE)] | Annotated[tei.TeiRerankRequest, Tag(TEI_SHAPE)],
    Discriminator(_body_shape),
    Body(
        openapi_examples={
            "native": {"summary": "native", "value": SPEC_EXAMPLE},
            "cohere-like": {
                "summary": "Cohere-like (Jina, Open WebUI, Dify, RAGFlow)",
                "value": {
                    "model": "rerank-v3.5",
                    "query": SPEC_EXAMPLE["query"],
                    "documents": SPEC_EXAMPLE["documents"],
                    "top_n": None,
                    "return_documents": "true",
                },
            },
            "tei": {"summary": "TEI (a body with texts)", "value": tei.TEI_EXAMPLE},
        }
    ),
]


@native_router.post(
    "/rerank",
    response_model=native.RerankResponse | list[tei.TeiRank],
    responses=ERROR_RESPONSES,
    summary="Rerank (native; also TEI and Cohere-like bodies)",
)
async def rerank(
    body: RerankBody, request: Request, service: ServiceDep
) -> native.RerankResponse | list[tei.TeiRank]:
    """Order `documents` by relevance to `query`; return the best `top_k`, best first.

    A body with `texts` is read as TEI's and answered with TEI's bare list of every text.
    """
    if isinstance(body, tei.TeiRerankRequest):
        work = tei.to_work(body, service.settings)
        (outcome,) = await answer(request, service, tei.NAME, work)
        return tei.from_outcome(outcome, body, service.served_model(outcome))
    work = native.to_work(body, service.settings)
    (outcome,) = await answer(request, service, native.NAME, work)
    return native.from_outcome(outcome, body, service.served_model(outcome))


@batch_router.post(
    "/rerank/batch", response_model=native.BatchRerankResponse, responses=ERROR_RESPONSES
)
async def rerank_batch(
    body: native.BatchRerankRequest, request: Request, service: ServiceDep
) -> native.BatchRerankResponse:
    """Rerank several queries' documents in one call; the answers come back in request order."""
    work = native.batch_to_work(body, service.settings)
    outcomes = await answer(request, service, native.BATCH_NAME, work)
    models = [service.served_model(outcome) for outcome in outcomes]
    return native.batch_from_outcomes(outcomes, body, models)


async def _cohere(
    body: cohere.CohereRerankRequest,
    version: Literal["1", "2"],
    request: Request,
    service: ServiceDep,
) -> cohere.CohereRerankResponse:
    work = cohere.to_work(body, service.settings)
    (outcome,) = await answer(request, service, cohere.NAME, work)
    return cohere.from_outcome(outcome, body, service.served_model(outcome), version)


@cohere_router.post(
    "/v1/rerank", response_model=cohere.CohereRerankResponse, responses=ERROR_RESPONSES
)
async def rerank_v1(
    body: cohere.CohereRerankRequest, request: Request, service: ServiceDep
) -> cohere.CohereRerankResponse:
    """Cohere v1 rerank (cohere `Client`, mem0, RAGFlow, Jina-style clients)."""
    return await _cohere(body, "1", request, service)


@cohere_router.post(
    "/v2/rerank", response_model=cohere.CohereRerankResponse, responses=ERROR_RESPONSES
)
async def rerank_v2(
    body: cohere.CohereRerankRequest, request: Request, service: ServiceDep
) -> cohere.CohereRerankResponse:
    """Cohere v2 rerank (cohere `ClientV2`, langchain-cohere, llama-index, Haystack)."""
    return await _cohere(body, "2", request, service)


@vllm_router.post("/score", response_model=vllm.ScoreResponse, responses=ERROR_RESPONSES)
@vllm_router.post("/v1/score", response_model=vllm.ScoreResponse, responses=ERROR_RESPONSES)
async def score(
    body: vllm.ScoreRequest, request: Request, service: ServiceDep
) -> vllm.ScoreResponse:
    """vLLM's score API: each `text_2` scored against `text_1`, in `text_2`'s order."""
    outcomes = await answer(request, service, vllm.NAME, vllm.to_work(body))
    model = service.served_model(outcomes[0]) if outcomes else service.final_model(body.model)
    return vllm.from_outcomes(outcomes, model)


@models_router.get("/v1/models", response_model=vllm.ModelList)
async def models(service: ServiceDep) -> vllm.ModelList:
    """The model names this server answers to (OpenAI's list shape)."""
    return vllm.model_list(service.model_names())


@tei_router.get("/info", response_model=tei.TeiInfo)
async def info(service: ServiceDep) -> tei.TeiInfo:
    """TEI's model info: Dify's TEI provider reads `model_type` (a reranker) before it adds the
    model."""
    return tei.info(service.final_model(), service.final_precision(), service.settings, __version__)


ROUTERS = (native_router, batch_router, cohere_router, vllm_router, tei_router, models_router)
